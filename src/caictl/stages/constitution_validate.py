"""constitution validate: check constitution files, each one's problems reported at once and every file checked
(a comma-separated spec is checked merged); exits 2 when any failed.

    caictl constitution validate mine.yaml harmless,mine.yaml
"""

from __future__ import annotations

from dataclasses import dataclass

from caictl.options import INPUT_OUTPUT, option


@dataclass
class ConstitutionValidateConfig:
    specs: list[str] = option(help="Files (or shipped names) to check.", panel=INPUT_OUTPUT, argument=True)


def run(config: ConstitutionValidateConfig) -> None:
    from caictl.data import constitution

    constitution.validate(config.specs)
