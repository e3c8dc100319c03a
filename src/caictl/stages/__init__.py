"""One module per command, named after it (`caictl eval mc` is `eval_mc.py`): each holds the command's config
dataclass and its `run(config)`. A stage never imports another stage: they talk through files."""
