"""Measures the eval stages share: pairwise and calibration metrics, win rates and Elo, signs of Goodharting in
responses (refusals, boilerplate, length), and the Markdown their reports are written in."""
