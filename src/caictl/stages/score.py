"""score: add a preference model's reward to each row of a file.

    caictl score --pm models/pm pairs.jsonl -o scored.jsonl

Pairs rows (`messages` + `responses`) get `rewards`, one per response; comparison rows (label output,
prompt/chosen/rejected, hh-rlhf, text_correct/text_incorrect) get `reward_chosen` and `reward_rejected`;
rows with `messages` and a `response` (revise output), or `messages` ending in an assistant turn, get `reward`.
"""

from __future__ import annotations

from dataclasses import dataclass

from caictl import model_kind
from caictl.errors import InputError, UsageError
from caictl.pm import Scorer, comparison_of, conversation_text
from caictl.records import STDIN, RecordWriter, read_rows
from caictl.ui import summary_table


@dataclass
class ScoreConfig:
    pm: str  # a train-pm output folder
    file: str | None = None  # None or "-" reads stdin
    out: str | None = None
    batch_size: int = 32
    max_length: int = 512


def run(config: ScoreConfig) -> dict:
    if config.out not in (None, STDIN) and config.file not in (None, STDIN) and config.out == config.file:
        raise UsageError("-o must differ from the input file")
    model_kind.check(config.pm, model_kind.SEQ_CLS, "--pm")
    rows = list(read_rows(config.file))
    plans = [_plan(row) for row in rows]
    scorer = Scorer(config.pm, max_length=config.max_length, batch_size=config.batch_size)
    all_texts = [text for _, texts in plans for text in texts]
    rewards, cut, cuts = scorer.score(all_texts), scorer.cut_tokens(all_texts), scorer.cuts()
    writer = RecordWriter(config.out, {}, overwrite=True)
    position, scored = 0, []
    for row, (fields, texts) in zip(rows, plans):
        values = rewards[position:position + len(texts)]
        row_cut = sum(cut[position:position + len(texts)])
        position += len(texts)
        record = dict(row.data)
        if fields == "rewards":
            record["rewards"] = values
        else:
            record.update(dict(zip(fields, values)))
        if cuts.count(row_cut):
            record[cuts.key] = row_cut
        scored.append(record)
    writer.write(scored)
    writer.close()
    mean = sum(rewards) / len(rewards) if rewards else None
    summary_table("score", [("rows", len(rows)), ("texts scored", len(all_texts)), ("mean reward", mean),
                            ("rows cut to --max-length", f"{cuts.rows} ({cuts.tokens:,} tokens)")])
    cuts.warn()
    return {"rows": len(rows), "texts": len(all_texts), "mean_reward": mean, **cuts.summary()}


def _plan(row) -> tuple[object, list[str]]:
    """Which reward fields a row gets, and the texts to score for them."""
    data = row.data
    if isinstance(data, dict) and isinstance(data.get("messages"), list) and isinstance(data.get("responses"), list):
        return "rewards", [conversation_text(data["messages"], r) for r in data["responses"]]
    if isinstance(data, dict) and isinstance(data.get("messages"), list) and isinstance(data.get("response"), str):
        return ("reward",), [conversation_text(data["messages"], data["response"])]
    if isinstance(data, dict) and isinstance(data.get("messages"), list) and data["messages"] \
            and data["messages"][-1].get("role") == "assistant":
        return ("reward",), [conversation_text(data["messages"])]
    try:
        comparison = comparison_of(data)
    except ValueError:
        raise InputError(f"{row.where}: nothing to score: expected responses, a response, a conversation ending "
                         "with the assistant, or chosen/rejected")
    return ("reward_chosen", "reward_rejected"), [comparison.chosen, comparison.rejected]

