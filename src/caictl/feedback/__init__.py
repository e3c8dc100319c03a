"""The feedback model: the multiple-choice question it is asked, its votes and labels, its rewards during RL, and
how far its labels agree with people's and with themselves."""
