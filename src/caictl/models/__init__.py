"""Models: real families offline, the random-weight models init-model builds, what a model folder holds and which
model it is, where a model name points (a folder, the hub cache), the preference model, and the plumbing the
training stages share (output folders, devices, processes, caictl.json)."""
