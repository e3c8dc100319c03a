"""score: add a preference model's reward to each row of a file.

    caictl score --pm models/pm pairs.jsonl -o scored.jsonl

Pairs rows (`messages` + `responses`) get `rewards`, one per response; comparison rows (label output,
prompt/chosen/rejected, hh-rlhf, text_correct/text_incorrect) get `reward_chosen` and `reward_rejected`;
rows with `messages` and a `response` (revise output), or `messages` ending in an assistant turn, get `reward`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from caictl import __version__
from caictl.data.reading import STDIN, in_shard, parse_shard, read_rows
from caictl.data.writing import NAMES_NOT_COMPARED, RecordWriter, batches
from caictl.errors import InputError, UsageError
from caictl.models import identity as model_identity
from caictl.models import kind as model_kind
from caictl.models.pm import Scorer, comparison_of, conversation_text
from caictl.options import INPUT_OUTPUT, MODEL_ENGINE, RUNS, common, option
from caictl.ui import log, meter, print_summary, row_counts

# The fields score adds to a row: dropped from an input row before its rewards are written again.
REWARD_FIELDS = ("rewards", "reward", "reward_chosen", "reward_rejected", "pm_truncated_tokens")


@dataclass
class ScoreConfig:
    pm: str = option(help="A train-pm output folder.", panel=MODEL_ENGINE)
    file: str | None = option(None, "Rows to score: responses, pairs or preferences; omit or '-' to read stdin.",
                              INPUT_OUTPUT, argument=True)
    out: str | None = option(None, "Output JSONL; omitted: records go to stdout.", INPUT_OUTPUT, short="-o")
    batch_size: int = option(32, "Rows scored and written at a time.", MODEL_ENGINE, settings="stage")
    max_length: int = option(512, "Tokens kept from the end of each conversation.", MODEL_ENGINE)
    overwrite: bool = option(False, "Start OUT afresh instead of resuming it.", RUNS)
    shard: str | None = common("shard", None, help="Only part K (from 0) of N, chosen by a hash of each row's id "
                                                   "(else its content), so N jobs cover the input once.")


def run(config: ScoreConfig) -> dict:
    """Scores rows in input order, writing each batch as it is done; run again, it resumes after the rows that
    OUT already holds (meta.score says which input row each came from, and with which PM)."""
    if config.out not in (None, STDIN) and config.file not in (None, STDIN) and config.out == config.file:
        raise UsageError("-o must differ from the input file")
    parse_shard(config.shard)
    model_kind.check(config.pm, model_kind.SEQ_CLS, "--pm")
    # Each row keeps its input index: meta.score.row names the input line even when a shard holds a part.
    rows = [(index, row) for index, row in enumerate(read_rows(config.file)) if in_shard(_shard_key(row), config.shard)]
    plans = [_plan(row) for _, row in rows]
    stamp = {"pm": config.pm, "pm_identity": model_identity.identity(config.pm), "max_length": config.max_length,
             "shard": config.shard, "caictl_version": __version__}
    writer = RecordWriter(config.out, {}, overwrite=config.overwrite)
    done = _rows_already_scored(writer.path, rows, stamp) if writer.path else 0
    if done:
        log(f"resuming {config.out}: {done} of {len(rows)} rows already scored")
    scorer = Scorer(config.pm, max_length=config.max_length, batch_size=config.batch_size)
    cuts, rewards, texts_scored = scorer.cuts(), [], 0
    start = time.perf_counter()
    try:
        with meter(len(rows) - done, "score", unit="rows") as progress:
            for chunk in batches(list(range(done, len(rows))), config.batch_size):
                texts = [text for i in chunk for text in plans[i][1]]
                values, cut = scorer.score(texts), scorer.cut_tokens(texts)
                position, scored = 0, []
                for i in chunk:
                    fields, row_texts = plans[i]
                    row_values = values[position:position + len(row_texts)]
                    row_cut = sum(cut[position:position + len(row_texts)])
                    position += len(row_texts)
                    index, row = rows[i]
                    scored.append(_scored_row(row.data, index, fields, row_values, row_cut, cuts, stamp))
                writer.write(scored)
                rewards += values
                texts_scored += len(texts)
                progress.advance(len(chunk))
    finally:
        writer.close()
    mean = sum(rewards) / len(rewards) if rewards else None
    summary = {"stage": "score",
               **row_counts(read=len(rows), written=len(rows) - done, skipped=done,
                            seconds=time.perf_counter() - start),
               "out": config.out or "-", "texts": texts_scored, "mean_reward": mean, **cuts.summary()}
    print_summary("score", summary, [("out", summary["out"]), ("texts scored", texts_scored),
                                     ("mean reward", mean),
                                     ("rows cut to --max-length", f"{cuts.rows} ({cuts.tokens:,} tokens)")])
    cuts.warn()
    return summary


def _scored_row(data: dict, index: int, fields, values: list[float], cut: int, cuts, stamp: dict) -> dict:
    """The input row with its rewards; meta.score says which input row it is and which PM scored it."""
    record = {key: value for key, value in data.items() if key not in REWARD_FIELDS}
    if fields == "rewards":
        record["rewards"] = values
    else:
        record.update(dict(zip(fields, values)))
    if cuts.count(cut):
        record[cuts.key] = cut
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    record["meta"] = {**meta, "score": {**stamp, "row": index + 1, "input_sha256": _digest(data)}}
    return record


def _rows_already_scored(out: Path, rows: list, stamp: dict) -> int:
    """How many rows OUT already holds, each checked to be the same input row scored with the same settings."""
    if not out.exists():
        return 0
    lines = [line for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    for index, line in enumerate(lines):
        try:
            written = json.loads(line).get("meta", {}).get("score", {})
        except (ValueError, AttributeError):
            written = {}
        same_settings = all(written.get(k) == v for k, v in stamp.items() if k not in NAMES_NOT_COMPARED)
        if index >= len(rows) or not same_settings or written.get("input_sha256") != _digest(rows[index][1].data):
            raise UsageError(f"{out}:{index + 1}: was not scored from this input row with these settings "
                             "(--pm, --max-length); pass --overwrite to start again, or -o a new file")
    return len(lines)


def _shard_key(row) -> str:
    """A row's id, else its content: score takes rows of any form, and some (hh-rlhf pairs) carry no id."""
    data = row.data
    return str(data["id"]) if isinstance(data, dict) and "id" in data else _digest(data)


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


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

