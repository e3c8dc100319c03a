"""OpenRLHF's custom reward function file, asking `caictl serve-pm` for the rewards (with its key, when it has one).

    caictl serve-pm --pm models/pm --policy models/sl-cai --host 0.0.0.0 --port 5000 --api-key-env PM_KEY
    export CAICTL_REWARD_URL=http://PM_HOST:5000   # several servers: separated by commas
    export CAICTL_REWARD_KEY=...                   # the server's key (unset: none is sent)
    ray job submit ... -- python3 -m openrlhf.cli.train_ppo_ray --reward.remote_url examples/openrlhf_reward_func.py ...
    # OpenRLHF before 0.10.2: --remote_rm_url examples/openrlhf_reward_func.py

OpenRLHF loads this file and calls `reward_func(queries, prompts, labels)`: queries are each prompt and response as
the policy's chat template wrote them, so the server runs with --policy (the policy OpenRLHF trains, or its
starting point: the same chat template). The variables must reach Ray's workers (`ray job submit
--runtime-env-json '{"env_vars": {...}}'`), and caictl must be installed there. Over what a plain --reward.remote_url
URL gives, caictl's client sends the key, spreads the requests over several servers and fails over between them.
"""

import os

import torch

import caictl.rewards

_client = None  # made on the first call, in the worker's process and environment; shared by OpenRLHF's threads


def reward_func(queries: list[str], prompts: list[str], labels: list) -> dict:
    """The server's answer for OpenRLHF: rewards (for the advantages), scores (for dynamic filtering) and
    extra_logs (logged per batch), one entry per query each."""
    global _client
    if _client is None:
        urls = os.environ.get(caictl.rewards.URL_ENV, "http://127.0.0.1:5000")
        key_env = caictl.rewards.KEY_ENV if os.environ.get(caictl.rewards.KEY_ENV) else None
        _client = caictl.rewards.RewardClient(urls, key_env)
    answer = _client.get_reward(queries, prompts, labels)
    return {"rewards": torch.tensor(answer["rewards"], dtype=torch.float32),
            "scores": torch.tensor(answer["scores"], dtype=torch.float32),
            # OpenRLHF logs tensors: the numeric logs only (a judge's principle per query is text).
            "extra_logs": {name: torch.tensor(values, dtype=torch.float32)
                           for name, values in answer["extra_logs"].items()
                           if all(isinstance(v, (int, float)) for v in values)}}
