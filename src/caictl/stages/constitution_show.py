"""constitution show: list a constitution's principles and examples, by id, so you can pick --principles.

    caictl constitution show harmless
"""

from __future__ import annotations

from dataclasses import dataclass

from caictl.options import INPUT_OUTPUT, option


@dataclass
class ConstitutionShowConfig:
    spec: str = option("harmless", "Shipped name or file(s), comma-separated.", INPUT_OUTPUT, argument=True)


def run(config: ConstitutionShowConfig) -> None:
    from caictl.data import constitution

    constitution.show(constitution.load(config.spec))
