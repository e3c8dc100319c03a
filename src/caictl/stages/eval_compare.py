r"""eval compare: models side by side on held-out prompts, harmlessness and helpfulness apart.

    caictl eval compare held-out/harmless.jsonl held-out/helpful.jsonl \
        --model base=models/base --model sl-cai=models/sl-cai \
        --model rl-cai=models/rl-cai --pm models/pm --judge models/base \
        -o eval/compare

Each input file is a prompt set, named after the file (`harmless.jsonl` is the set "harmless"; a row's own
`set` field wins). Every model answers every prompt once (seeded sampling; re-running resumes, and adding a
model answers only for it). Then, for each pair of models on each prompt:
- `--pm`: the preference model scores both responses; the higher reward wins. The same text (after stripping)
  or rewards within 1e-6 x max(1, |reward|) is a tie, half a win each: batch noise decides nothing.
- `--judge`: a feedback model compares them through the label machinery, both orders averaged, under a
  comparison principle drawn from the set's constitution: `--set-constitution helpful=helpful` judges the set
  "helpful" under the shipped helpful constitution; a set not named there is judged under `--constitution`
  (harmless by default), whatever its name. The constitution and principle are recorded with each judgement.
- Constraints: rows that carry `constraints` (caictl.data.constraints) are checked without a judge; per model and set,
  the share of constraints met and the share of prompts with all of them met.
From these: win rates with bootstrap intervals and Elo ratings across all models, per set and overall. Per
model, the signs of Goodharting (caictl.evaluation.textstats): refusal rate, boilerplate rate, distinct-n, mean length;
`--judge-refusal` adds the judge's probability that a response refuses or evades.

When sets under `harmless` and under `helpful` are both compared: the paper's frontier, each model's helpfulness
Elo against its harmlessness Elo (frontier.png).

Output folder: responses.jsonl (resumable), judgements.jsonl, records.jsonl (one row per response with every
score), summary.json, report.md, elo.png, winrates.png, goodhart.png, and frontier.png when it applies.
"""

from __future__ import annotations

import gc
import json
import random
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from caictl import __version__
from caictl.data import constraints as constraint_checks
from caictl.data.constitution import load_for_stage
from caictl.data.reading import read_prompts, read_rows
from caictl.data.records import Prompt
from caictl.data.writing import RecordWriter, batches
from caictl.engines import ENGINES, SamplingParams, sampler
from caictl.engines.generation import (
    PROMPT_STYLES,
    STOP_RESPONSE,
    Cuts,
    log_servers,
    open_engine,
    prompt_meta,
    prompt_style,
    respond,
    response_request,
)
from caictl.errors import UsageError
from caictl.evaluation.compare_report import STAT_COLUMNS, format_stat, plot, report
from caictl.evaluation.ratings import Outcome, elo, elo_points, share_of_win, win_rates
from caictl.evaluation.textstats import is_refusal, response_stats
from caictl.models import identity as model_identity
from caictl.models import kind as model_kind
from caictl.options import INPUT_OUTPUT, METHOD, MODEL_ENGINE, RUNS, SAMPLING, common, option
from caictl.ui import log, meter, print_summary, row_counts

ALL = "all"


@dataclass
class EvalCompareConfig:
    prompts: list[str] = option(help="Prompt files, one set each (named after the file).", panel=INPUT_OUTPUT,
                                argument=True)
    out: str = option(help="Output folder.", panel=INPUT_OUTPUT, short="-o")
    models: list[str] = option(help="NAME=PATH (or PATH, named after the folder) of a model to compare; repeat for "
                                    "each model.", panel=MODEL_ENGINE, default_factory=list, flag="--model",
                               repeat=True, metavar="NAME=PATH")
    pm: str | None = option(None, "A train-pm folder: reward each response, higher wins (the same text, or rewards "
                                  "within 1e-6, tie).", METHOD)
    judge: str | None = option(None, "A feedback model: judge each pair, both orders.", METHOD)
    judge_refusal: bool = option(False, "Also ask the judge whether each response refuses.", METHOD)
    engine: str = common("engine", "hf")
    base_url: str | list[str] | None = common("base_url", None)
    constitution: str = common("constitution", "harmless", help="The judge's principles for every set not named in "
                                                                "--set-constitution: shipped name or file(s).")
    set_constitutions: list[str] = option(help="SET=CONSTITUTION: the judge draws that set's principles from this "
                                               "constitution (e.g. helpful=helpful); repeat per set.", panel=METHOD,
                                          default_factory=list, flag="--set-constitution", repeat=True,
                                          metavar="SET=NAME")
    prompt_style: str = option("auto", "auto, chat or transcript.", METHOD)
    max_new_tokens: int = option(128, "Response length cap, in tokens.", SAMPLING, settings="stage")
    temperature: float = option(1.0, "Sampling temperature; 0 is greedy.", SAMPLING, settings="stage")
    top_p: float = option(1.0, "Nucleus sampling mass.", SAMPLING)
    batch_size: int = option(16, "Sequences per forward pass (hf engine).", MODEL_ENGINE, settings="stage")
    concurrency: int = common("concurrency", 8)
    compile: bool | None = common("compile", None)
    max_retries: int | None = common("max_retries", None)
    timeout: float | None = common("timeout", None)
    tokenizer: str | None = common("tokenizer", None)
    limit: int | None = option(None, "At most N prompts per set.", INPUT_OUTPUT)
    seed: int = common("seed", 0)
    overwrite: bool = option(False, "Answer and judge again from scratch.", RUNS)

    def check(self) -> dict[str, str]:
        """The models by name."""
        problems = []
        if self.engine not in ENGINES:
            problems.append(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.prompt_style not in PROMPT_STYLES:
            problems.append(f"--prompt-style {self.prompt_style!r}: choose one of {', '.join(PROMPT_STYLES)}")
        if not self.models:
            problems.append("give at least one --model (NAME=PATH, or a folder)")
        if self.judge_refusal and not self.judge:
            problems.append("--judge-refusal needs --judge MODEL")
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be at least 1")
        problems += _mapping_problems(self.set_constitutions)
        models: dict[str, str] = {}
        for spec in self.models:
            name, _, path = spec.rpartition("=") if "=" in spec else (Path(spec.rstrip("/")).name, "", spec)
            if not name or not path:
                problems.append(f"--model {spec!r}: write NAME=PATH or PATH")
            elif name in models:
                problems.append(f"--model {spec!r}: the name {name!r} is used twice; write NAME=PATH")
            else:
                models[name] = path
        if problems:
            raise UsageError("; ".join(problems))
        if self.engine == "hf":
            for name, path in models.items():
                model_kind.check(path, model_kind.CAUSAL_LM, f"--model {name}=")
            if self.judge:
                model_kind.check(self.judge, model_kind.CAUSAL_LM, "--judge")
        if self.pm:
            model_kind.check(self.pm, model_kind.SEQ_CLS, "--pm")
        return models


@dataclass
class Item:
    """One prompt of one set; `key` is unique across sets."""

    set: str
    prompt: Prompt

    @property
    def key(self) -> str:
        return f"{self.set}/{self.prompt.id}"


def run(config: EvalCompareConfig) -> dict:
    models = config.check()
    items = read_sets(config.prompts, config.limit)
    # Each set's constitution, and the judge's constitutions loaded, before any model: a bad name fails here.
    by_set = constitution_per_set(config, items)
    constitutions = {name: load_for_stage(name, [], "comparison") for name in dict.fromkeys(by_set.values())} \
        if config.judge else {}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    responses, generated, tokens = answer(config, models, items, out / "responses.jsonl")
    rows = [{"id": f"{name}/{item.key}", "model": name, "set": item.set, "prompt_id": item.prompt.id,
             "messages": item.prompt.messages, **responses[(name, item.key)]}
            for name in models for item in items]
    for row, (name, item) in zip(rows, [(n, i) for n in models for i in items]):
        row["refusal"] = is_refusal(row["response"])
        if "constraints" in item.prompt.extra:
            met = constraint_checks.check_all(row["response"], item.prompt.extra["constraints"])
            row["constraints"] = [{**c, "met": m} for c, m in zip(item.prompt.extra["constraints"], met)]

    outcomes: dict[str, list[tuple[str, Outcome]]] = {}
    if config.pm:
        outcomes["pm"] = pm_outcomes(config, models, items, rows)
    if config.judge:
        outcomes["judge"] = judge_outcomes(config, models, items, rows, by_set, constitutions,
                                           out / "judgements.jsonl")

    # Rows read are prompts; rows written and skipped are responses (one per model and prompt) in
    # responses.jsonl, skipped when an earlier run already answered them.
    summary = {"stage": "eval compare",
               **row_counts(read=len(items), written=generated, skipped=len(rows) - generated,
                            seconds=time.perf_counter() - start, tokens=tokens),
               **summarise(config, models, items, rows, outcomes, by_set)}
    with open(out / "records.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({k: v for k, v in row.items() if k != "messages"}, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out)
    (out / "report.md").write_text(report(summary))
    _print(summary, out)
    return summary


# Prompts and responses ---------------------------------------------------------------------------------


def read_sets(files: list[str], limit: int | None) -> list[Item]:
    if not files:
        raise UsageError("give at least one prompt file")
    items = []
    for path in files:
        if path != "-" and not Path(path).exists():
            raise UsageError(f"{path}: no such file")
        name = Path(path).name.split(".")[0] if path != "-" else "stdin"
        per_set: dict[str, int] = {}
        for prompt in read_prompts(path):
            set_name = str(prompt.extra.get("set") or name)
            if limit and per_set.get(set_name, 0) >= limit:
                continue
            per_set[set_name] = per_set.get(set_name, 0) + 1
            items.append(Item(set_name, prompt))
    constraint_checks.validate_rows([(f"{path}: prompt {item.prompt.id!r}", item.prompt.extra["constraints"])
                                     for item in items if "constraints" in item.prompt.extra])
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise UsageError(f"prompt {duplicate!r} appears in two files of the same set; give the files other names")
    return items


def constitution_per_set(config: EvalCompareConfig, items: list[Item]) -> dict[str, str]:
    """Set -> the constitution its judgements draw principles from: as --set-constitution maps it, else
    --constitution. A set's name alone never decides: "helpful-x" unmapped is judged like any other set."""
    sets = list(dict.fromkeys(item.set for item in items))
    mapping = dict(spec.split("=", 1) for spec in config.set_constitutions)
    unknown = [name for name in mapping if name not in sets]
    if unknown:
        raise UsageError(f"--set-constitution names set(s) {', '.join(map(repr, unknown))} that no prompt file holds; "
                         f"the sets are {', '.join(map(repr, sets))} (a file's name, or a row's `set` field)")
    return {name: mapping.get(name, config.constitution) for name in sets}


def answer(config: EvalCompareConfig, models: dict[str, str], items: list[Item], path: Path) -> tuple[dict, int, int]:
    """Every model's response to every prompt, generated once: (model, item key) -> response fields; and how many
    responses, and tokens, this run generated."""
    run_settings = {"stage": "eval compare", "engine": config.engine, "prompt_style": config.prompt_style,
                    "sampling": {"temperature": config.temperature, "top_p": config.top_p,
                                 "max_new_tokens": config.max_new_tokens, "sampler": sampler(config.engine)},
                    "seed": config.seed, "caictl_version": __version__}
    writer = RecordWriter(path, run_settings, overwrite=config.overwrite)
    cuts = Cuts()
    generated, tokens = 0, 0
    identities = {name: model_identity.identity(model, config.engine) for name, model in models.items()}
    try:
        for name, model in models.items():
            pending = [item for item in items if f"{name}/{item.key}" not in writer.done]
            if not pending:
                continue
            engine = open_engine(config, model)
            style = prompt_style(config.prompt_style, engine)
            params = SamplingParams(config.max_new_tokens, config.temperature, config.top_p, STOP_RESPONSE,
                                    config.seed)
            with meter(len(pending), f"answer {name}") as progress:
                for chunk in batches(pending, config.batch_size):  # written batch by batch
                    # Keyed by prompt, not model: two models see the same sampling noise per prompt.
                    results = respond(engine, style, [response_request(style, i.prompt.messages) for i in chunk],
                                      params, [f"{i.key}/eval" for i in chunk])
                    writer.write([{"id": f"{name}/{i.key}", "model": name, "model_path": model,
                                   "model_identity": identities[name],
                                   "response": g.text.strip(), "finish_reason": g.finish_reason,
                                   "meta": {**cuts.meta(run_settings, g.truncated_tokens), **prompt_meta(engine)}}
                                  for i, g in zip(chunk, results)])
                    generated += len(chunk)
                    tokens += sum(g.completion_tokens for g in results)
                    progress.advance(len(chunk), sum(g.completion_tokens for g in results))
            log_servers(engine)
            del engine
            gc.collect()
    finally:
        writer.close()
    cuts.warn()
    wanted = {f"{name}/{item.key}" for name in models for item in items}
    responses = {}
    for row in read_rows(path):
        if row.data.get("id") in wanted and row.data.get("model_identity") == identities.get(row.data.get("model")):
            key = row.data["id"][len(row.data["model"]) + 1:]
            responses[(row.data["model"], key)] = {"response": row.data["response"],
                                                   "finish_reason": row.data["finish_reason"]}
    missing = [f"{n}/{i.key}" for n in models for i in items if (n, i.key) not in responses]
    if missing:
        raise UsageError(f"{path}: {missing[0]} was answered by another model folder under the same name; "
                         "pass --overwrite, or give the model another NAME")
    return responses, generated, tokens


# Pairwise outcomes ---------------------------------------------------------------------------------------


def pm_outcomes(config: EvalCompareConfig, models: dict[str, str], items: list[Item], rows: list[dict]):
    """PM reward of every response; on each prompt the higher reward wins. The same text, or rewards equal within
    ratings.TIE_TOLERANCE, is a tie: half a win each."""
    from caictl.models.pm import Scorer, conversation_text

    scorer = Scorer(config.pm, batch_size=config.batch_size)
    log(f"scoring {len(rows)} responses with {config.pm}")
    texts = [conversation_text(r["messages"], r["response"]) for r in rows]
    rewards, cuts = scorer.score(texts), scorer.cuts()
    reward = {}
    for row, value, cut in zip(rows, rewards, scorer.cut_tokens(texts)):
        row["reward"] = round(value, 5)
        if cuts.count(cut):
            row[cuts.key] = cut
        reward[(row["model"], f"{row['set']}/{row['prompt_id']}")] = value
    response = {(r["model"], f"{r['set']}/{r['prompt_id']}"): r["response"].strip() for r in rows}
    outcomes = []
    for a, b in combinations(models, 2):
        for item in items:
            if response[(a, item.key)] == response[(b, item.key)]:
                score = 0.5  # the same text: any reward difference is batch noise
            else:
                score = share_of_win(reward[(a, item.key)], reward[(b, item.key)])
            outcomes.append((item.set, Outcome(item.key, a, b, score)))
    cuts.warn()
    return outcomes


def judge_outcomes(config: EvalCompareConfig, models: dict[str, str], items: list[Item], rows: list[dict],
                   by_set: dict[str, str], constitutions: dict, path: Path):
    from caictl.feedback.judge import Judge, PairToJudge

    response = {(r["model"], f"{r['set']}/{r['prompt_id']}"): r["response"] for r in rows}
    comparisons = []
    for a, b in combinations(models, 2):
        for item in items:
            comparison_id = f"{a}|{b}/{item.key}"
            name = by_set[item.set]
            principle = random.Random(f"{config.seed}:{comparison_id}").choice(constitutions[name].comparison)
            comparisons.append(PairToJudge(comparison_id, item.prompt.messages, response[(a, item.key)],
                                           response[(b, item.key)], [principle],
                                           {"set": item.set, "prompt_id": item.prompt.id, "a": a, "b": b,
                                            "constitution": name}))
    run_settings = {"stage": "eval compare judge", "judge": config.judge,
                    "judge_identity": model_identity.identity(config.judge, config.engine),
                    # Per set: a changed mapping or a changed constitution refuses to resume these judgements.
                    "set_constitutions": {s: {"name": n, "hash": constitutions[n].content_hash()}
                                          for s, n in by_set.items()}, "seed": config.seed,
                    "caictl_version": __version__}
    # A judgement is valid for the responses it saw: answering again (--overwrite) judges again.
    writer = RecordWriter(path, run_settings, overwrite=config.overwrite)
    pending = [c for c in comparisons if c.id not in writer.done]
    engine, cuts = None, Cuts("judge question(s) did not fit the model's context")
    try:
        if pending or config.judge_refusal:
            engine = open_engine(config, config.judge)
            writer.settle(prompt_meta(engine))
        # Without few-shot examples the judge reads nothing from its constitution but the principle each comparison
        # carries, so one judge serves every set.
        judge = Judge(engine, next(iter(constitutions.values())), debias=True, seed=config.seed)
        with meter(len(pending), "judge", unit="pairs") as progress:
            for chunk in batches(pending, config.batch_size):
                writer.write([{"id": c.id, **c.extra, "first": c.first, "second": c.second, **votes[0],
                               "meta": cuts.meta(run_settings, votes[0].get("truncated_tokens", 0))}
                              for c, votes in zip(chunk, judge.votes(chunk))])
                progress.advance(len(chunk))
    finally:
        writer.close()
    if config.judge_refusal:
        log(f"asking {config.judge} whether each of {len(rows)} responses refuses")
        probabilities, cut = judge.refusal_probabilities([r["messages"] for r in rows], [r["response"] for r in rows])
        refusal_cuts = Cuts("refusal question(s) did not fit the judge's context", "judge_refusal_truncated_tokens")
        for row, p, c in zip(rows, probabilities, cut):
            row["judge_refusal"] = round(p, 5)
            if refusal_cuts.count(c):
                row["judge_refusal_truncated_tokens"] = c
        refusal_cuts.warn()
    log_servers(engine)
    cuts.warn()
    judged = {}
    for row in read_rows(path):
        judged[row.data["id"]] = row.data
    outcomes = []
    for c in comparisons:
        record = judged[c.id]
        if (record["first"], record["second"]) != (c.first, c.second):
            raise UsageError(f"{path}: {c.id} judged other responses than these; pass --overwrite to judge again")
        outcomes.append((c.extra["set"], Outcome(f"{c.extra['set']}/{c.extra['prompt_id']}", c.extra["a"],
                                                 c.extra["b"], record["p"])))
    return outcomes


# Summary -----------------------------------------------------------------------------------------------


def summarise(config: EvalCompareConfig, models: dict[str, str], items: list[Item], rows: list[dict],
              outcomes: dict[str, list[tuple[str, Outcome]]], by_set: dict[str, str]) -> dict:
    sets = list(dict.fromkeys(item.set for item in items))
    groups = sets + [ALL] if len(sets) > 1 else sets
    per_model: dict[str, dict] = {}
    for group in groups:
        per_model[group] = {}
        for name in models:
            mine = [r for r in rows if r["model"] == name and group in (ALL, r["set"])]
            stats = response_stats([r["response"] for r in mine])
            if "reward" in mine[0]:
                stats["mean_reward"] = round(sum(r["reward"] for r in mine) / len(mine), 4)
            if "judge_refusal" in mine[0]:
                stats["judge_refusal"] = round(sum(r["judge_refusal"] for r in mine) / len(mine), 4)
            checked = [r["constraints"] for r in mine if r.get("constraints")]
            if checked:  # IFEval's two figures: per constraint and per prompt
                results = [c["met"] for row in checked for c in row]
                stats["constraints_met"] = round(sum(results) / len(results), 4)
                stats["prompts_all_met"] = round(sum(all(c["met"] for c in row) for row in checked) / len(checked), 4)
                stats["constraints_checked"] = len(results)
            per_model[group][name] = stats
    ratings: dict[str, dict] = {}
    for source, pairs in outcomes.items():
        for group in groups:
            chosen = [o for s, o in pairs if group in (ALL, s)]
            if chosen:  # none with a single model
                ratings.setdefault(source, {})[group] = {"win_rates": win_rates(chosen, config.seed),
                                                         "elo": elo(chosen, list(models), config.seed)}
    return {"stage": "eval compare", "models": models, "sets": {s: sum(i.set == s for i in items) for s in sets},
            "frontier": frontier(models, outcomes, by_set),
            "pm": config.pm, "judge": config.judge, "set_constitutions": by_set, "engine": config.engine,
            "sampling": {"temperature": config.temperature, "top_p": config.top_p,
                         "max_new_tokens": config.max_new_tokens, "seed": config.seed},
            "per_model": per_model, "ratings": ratings, "caictl_version": __version__}


def frontier(models: dict[str, str], outcomes: dict[str, list[tuple[str, Outcome]]],
             by_set: dict[str, str]) -> dict | None:
    """The paper's frontier (Bai et al. 2022, figure 2): per model, its Elo on the sets judged under `helpful`
    against its Elo on the sets judged under `harmless`, from the judge's comparisons (else the PM's); None unless
    sets under both constitutions were compared."""
    if not outcomes or not {"harmless", "helpful"} <= set(by_set.values()):
        return None
    source = "judge" if "judge" in outcomes else "pm"
    result = {"source": source}
    for name in ("helpful", "harmless"):
        chosen = [o for s, o in outcomes[source] if by_set[s] == name]
        result[name] = elo_points(chosen, list(models))  # the point ratings: the figure draws no intervals
    return result


def _mapping_problems(specs: list[str]) -> list[str]:
    problems, seen = [], set()
    for spec in specs:
        name, _, constitution = spec.partition("=")
        if not name or not constitution:
            problems.append(f"--set-constitution {spec!r}: write SET=CONSTITUTION, e.g. helpful=helpful")
        elif name in seen:
            problems.append(f"--set-constitution {spec!r}: the set {name!r} is mapped twice")
        seen.add(name)
    return problems


def _print(summary: dict, out: Path) -> None:
    rows = []
    for group, by_model in summary["per_model"].items():
        for model, s in by_model.items():
            stats = ", ".join(f"{t} {format_stat(s[k])}" for k, t in STAT_COLUMNS if k in s)
            rows.append((f"{group} / {model}", stats))
    for source, by_group in summary["ratings"].items():
        for group, result in by_group.items():
            elo = ", ".join(f"{m} {e['elo']:+.0f}" for m, e in result["elo"].items())
            rows.append((f"Elo {source} / {group}", elo))
    rows.append(("report", out / "report.md"))
    print_summary("eval compare", summary, rows)
