"""constitution convert: convert (and merge) constitutions into caictl's own format.

    caictl constitution convert constitution.txt -o mine.yaml --name mine
"""

from __future__ import annotations

from dataclasses import dataclass

from caictl.options import INPUT_OUTPUT, option


@dataclass
class ConstitutionConvertConfig:
    specs: list[str] = option(help="Files to merge: Anthropic's prompt files, llm-swarm JSON, YAML.",
                              panel=INPUT_OUTPUT, argument=True)
    out: str | None = option(None, "Output .yaml/.yml (YAML) or .json (JSON); unset: YAML to stdout.", INPUT_OUTPUT,
                             short="-o")
    name: str | None = option(None, "Name of the merged constitution.", INPUT_OUTPUT)


def run(config: ConstitutionConvertConfig) -> None:
    from caictl.data import constitution

    constitution.convert(config.specs, config.out, config.name)
