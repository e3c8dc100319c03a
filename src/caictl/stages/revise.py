"""revise: the supervised stage's data. Critique -> revision, several rounds, a random principle each round.

    caictl revise red-team.jsonl --model models/tiny -o revisions.jsonl

For every prompt the model answers; then, each round, a principle is drawn from the constitution, the model
critiques its current response under it, and revises; the next round critiques that revision (paper, 3.1:
four rounds). Few-shot exchanges keep the model in its role. Every step is recorded with its principle id,
and revisions that come back empty or that copy the critique are flagged, never passed on silently.
"""

from __future__ import annotations

import difflib
import random
import re
import time
from dataclasses import dataclass, field

from caictl import __version__, settings
from caictl.data.constitution import Constitution, CritiquePrinciple, load_for_stage
from caictl.data.conversation import render_transcript
from caictl.data.reading import read_prompts, shard_problem, this_shard
from caictl.data.records import UNUSABLE_REVISION_FLAGS, Prompt
from caictl.data.writing import RecordWriter, RejectWriter, batches, with_upstream
from caictl.engines import ENGINES, SamplingParams, sampler
from caictl.engines.generation import (
    PROMPT_STYLES,
    STOP_RESPONSE,
    Cuts,
    engine_summary,
    log_servers,
    open_engine,
    prompt_meta,
    prompt_style,
    respond,
    response_request,
)
from caictl.errors import UsageError
from caictl.models import identity as model_identity
from caictl.models import kind as model_kind
from caictl.options import INPUT_OUTPUT, METHOD, MODEL_ENGINE, RUNS, SAMPLING, common, option
from caictl.ui import log, meter, print_summary, row_counts

FORMATS = ("caictl", "hf")


@dataclass
class ReviseConfig:
    prompts: str | None = option(None, "Input JSONL/JSON/.gz file; omit or '-' to read stdin.", INPUT_OUTPUT,
                                 argument=True)
    out: str | None = option(None, "Output JSONL; omitted: records go to stdout.", INPUT_OUTPUT, short="-o")
    model: str | None = common("model", None)
    engine: str = common("engine", "hf")
    base_url: str | list[str] | None = common("base_url", None)
    constitution: str = common("constitution", "harmless")
    principles: list[str] = option(help="Principle ids to draw from, comma-separated; unset: all.", panel=METHOD,
                                   default_factory=list, split=",", metavar="IDS")
    rounds: int = option(4, "Critique -> revision rounds per prompt (paper: 4).", METHOD, settings="stage")
    few_shot: bool = option(True, "Show the constitution's worked exchanges before each request.", METHOD)
    shots: int | None = option(None, "At most N shared few-shot exchanges (one draw per run); unset: all.", METHOD)
    critique: bool = option(True, "--no-critique revises directly, without a critique (the paper's ablation).",
                            METHOD)
    prompt_style: str = option("auto", "chat (the model's chat template), transcript (Human:/Assistant:, for base "
                                       "models) or auto.", METHOD)
    temperature: float = option(1.0, "Sampling temperature; 0 is greedy.", SAMPLING, settings="stage")
    top_p: float = option(1.0, "Nucleus sampling mass.", SAMPLING)
    max_new_tokens: int = option(256, "Tokens per response, critique or revision.", SAMPLING, settings="stage")
    batch_size: int = option(16, "Prompts per forward pass (hf engine).", MODEL_ENGINE, settings="stage")
    concurrency: int = common("concurrency", 8)
    compile: bool | None = common("compile", None)
    max_retries: int | None = common("max_retries", None)
    timeout: float | None = common("timeout", None)
    tokenizer: str | None = common("tokenizer", None)
    seed: int = common("seed", 0)
    limit: int | None = option(None, "Only the first N prompts.", INPUT_OUTPUT)
    shard: str | None = common("shard", None)
    format: str = option("caictl", "caictl (revision records) or hf (cai-conversation-harmless columns).",
                         INPUT_OUTPUT)
    skip_invalid: bool = common("skip_invalid", False)
    overwrite: bool = option(False, "Start OUT afresh instead of resuming it.", RUNS)

    def check(self) -> None:
        problems = []
        if self.engine not in ENGINES:
            problems.append(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.rounds < 1:
            problems.append("--rounds must be at least 1")
        if self.temperature < 0:
            problems.append("--temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            problems.append("--top-p must be in (0, 1]")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.concurrency < 1:
            problems.append("--max-new-tokens, --batch-size and --concurrency must be at least 1")
        if self.shots is not None and self.shots < 0:
            problems.append("--shots must be >= 0")
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be at least 1")
        if self.prompt_style not in PROMPT_STYLES:
            problems.append(f"--prompt-style {self.prompt_style!r}: choose one of {', '.join(PROMPT_STYLES)}")
        if self.format not in FORMATS:
            problems.append(f"--format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if problem := shard_problem(self.shard):
            problems.append(problem)
        if problems:
            raise UsageError("; ".join(problems))


def run(config: ReviseConfig, engine=None) -> dict:
    """Revise every prompt not yet in the output; return the summary. engine: one already made (from Python,
    or a test's scripted engine); by default --engine opens one."""
    config.check()
    model = engine.model if engine is not None else settings.require_model(config.model)
    constitution = load_for_stage(config.constitution, config.principles, "critique_revision")
    if engine is None and config.engine == "hf":  # after the options: a hub id may cost a request to the hub
        model_kind.check(model, model_kind.CAUSAL_LM, "--model")

    rejects = RejectWriter(config.out) if config.skip_invalid else None
    prompts = read_prompts(config.prompts, on_invalid=rejects)
    if config.limit:
        prompts = prompts[: config.limit]  # --limit first: the N jobs of a sharded run split the same prompts
    prompts = this_shard(prompts, config.shard, "prompts")
    run_settings = _settings(config, model, constitution)
    writer = RecordWriter(config.out, run_settings, overwrite=config.overwrite)
    pending = [p for p in prompts if p.id not in writer.done]
    if writer.done:
        log(f"resuming {config.out}: {len(prompts) - len(pending)} of {len(prompts)} prompts already done"
            + (" (dropped a truncated last line)" if writer.dropped_partial_line else ""))

    totals = Totals()
    start = time.perf_counter()
    try:
        if pending:
            engine = engine or open_engine(config, model)
            writer.settle(prompt_meta(engine))
            reviser = Reviser(engine, constitution, config, prompt_style(config.prompt_style, engine))
            with meter(len(pending), "revise") as progress:
                # A batch of prompts goes through every round and is written before the next one starts: a
                # killed run loses at most one batch (benchmarks/bench_revise.py --vs-windows: no slower).
                for chunk in batches(pending, config.batch_size):
                    records = reviser.revise(chunk, totals)
                    if config.format == "hf":
                        records = [to_hf_columns(r) for r in records]
                    for record in records:
                        record["meta"] = {**run_settings, **record["meta"]}
                    writer.write(records)
                    progress.advance(len(chunk), totals.tokens - progress.tokens)
            log_servers(engine)
    finally:
        writer.close()

    rejected = rejects.count if rejects else 0
    summary = {
        "stage": "revise",
        **row_counts(read=len(prompts) + rejected, written=len(pending), skipped=len(prompts) - len(pending),
                     rejected=rejected, seconds=time.perf_counter() - start, tokens=totals.completion_tokens),
        "out": config.out or "-",
        "rounds": config.rounds,
        "principle_counts": dict(sorted(totals.principles.items())),
        "flagged_rows": totals.flagged_rows,
        "flag_counts": dict(sorted(totals.flags.items())),
        **totals.cuts.summary(),
        "prompt_tokens": totals.prompt_tokens,
        **engine_summary(engine),
    }
    _print_summary(summary, rejects)
    totals.cuts.warn()
    return summary


@dataclass
class Totals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    flagged_rows: int = 0
    cuts: Cuts = field(default_factory=Cuts)
    principles: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.completion_tokens

    def add(self, generations) -> None:
        for g in generations:
            self.prompt_tokens += g.prompt_tokens
            self.completion_tokens += g.completion_tokens


class Reviser:
    """Runs the loop for a window of prompts: every step is one batched engine call."""

    def __init__(self, engine, constitution: Constitution, config: ReviseConfig, style: str):
        self.engine = engine
        self.constitution = constitution
        self.config = config
        self.style = style

    def revise(self, prompts: list[Prompt], totals: Totals) -> list[dict]:
        config = self.config
        drawn = [
            self.constitution.draw_critique_principles(config.rounds, random.Random(f"{config.seed}:{p.id}"))
            for p in prompts
        ]
        initial = self._generate([response_request(self.style, p.messages) for p in prompts],
                                 [f"{p.id}/initial" for p in prompts], STOP_INITIAL, totals)
        truncated = [g.truncated_tokens for g in initial]  # per prompt, over all its model calls
        current = [clean_response(g.text) for g in initial]
        initial_responses = list(current)
        steps: list[list[dict]] = [[] for _ in prompts]
        for round_index in range(config.rounds):
            principles = [d[round_index] for d in drawn]
            critiques = [""] * len(prompts)
            if config.critique:
                requests = [self._critique_request(p, c, pr) for p, c, pr in zip(prompts, current, principles)]
                results = self._generate(requests, [f"{p.id}/{round_index}/critique" for p in prompts],
                                         STOP_CRITIQUE, totals)
                critiques = [clean_response(g.text) for g in results]
                truncated = [t + g.truncated_tokens for t, g in zip(truncated, results)]
            requests = [self._revision_request(p, c, pr, cr)
                        for p, c, pr, cr in zip(prompts, current, principles, critiques)]
            results = self._generate(requests, [f"{p.id}/{round_index}/revision" for p in prompts],
                                     STOP_REVISION, totals)
            truncated = [t + g.truncated_tokens for t, g in zip(truncated, results)]
            for i, generation in enumerate(results):
                revision = clean_response(generation.text)
                flags = revision_flags(revision, critiques[i], config.critique, generation.finish_reason)
                step = {"round": round_index + 1, "principle": principles[i].id}
                if config.critique:
                    step |= {"critique_request": principles[i].critique_request, "critique": critiques[i]}
                step |= {"revision_request": principles[i].revision_request, "revision": revision, "flags": flags}
                steps[i].append(step)
                # A flagged-empty or critique-copy revision is recorded but not built on: the next round
                # critiques the last usable response.
                if not UNUSABLE_REVISION_FLAGS & set(flags):
                    current[i] = revision
                totals.principles[principles[i].id] = totals.principles.get(principles[i].id, 0) + 1
        records = []
        for i, prompt in enumerate(prompts):
            flags = sorted({f for step in steps[i] for f in step["flags"]})
            if flags:
                totals.flagged_rows += 1
            for flag in flags:
                totals.flags[flag] = totals.flags.get(flag, 0) + 1
            meta = totals.cuts.meta({"principles": [step["principle"] for step in steps[i]]}, truncated[i])
            meta = with_upstream(meta, prompt.extra.get("meta"))  # a prompt row made by an earlier stage
            records.append({
                **prompt.extra,
                "id": prompt.id,
                "messages": prompt.messages,
                "initial_response": initial_responses[i],
                "steps": steps[i],
                "response": current[i],
                "flags": flags,
                "meta": meta,
            })
        return records

    # Requests. A request is a chat (list of messages) or a transcript (text), by prompt style.

    def _generate(self, requests: list, keys: list[str], stop: tuple[str, ...], totals: Totals):
        config = self.config
        params = SamplingParams(config.max_new_tokens, config.temperature, config.top_p, stop, config.seed)
        results = respond(self.engine, self.style, requests, params, keys)
        totals.add(results)
        return results

    def _critique_request(self, prompt: Prompt, response: str, principle: CritiquePrinciple):
        conversation = prompt.messages + [{"role": "assistant", "content": response}]
        if self.style == "chat":
            return self._with_examples(principle, conversation + [
                {"role": "user", "content": principle.critique_request}])
        return (self._transcript_examples(principle) + render_transcript(conversation)
                + f"\n\nCritiqueRequest: {principle.critique_request}\n\nCritique:")

    def _revision_request(self, prompt: Prompt, response: str, principle: CritiquePrinciple, critique: str):
        conversation = prompt.messages + [{"role": "assistant", "content": response}]
        if self.style == "chat":
            turns = []
            if self.config.critique:
                turns = [{"role": "user", "content": principle.critique_request},
                         {"role": "assistant", "content": critique}]
            turns.append({"role": "user", "content": principle.revision_request})
            return self._with_examples(principle, conversation + turns)
        text = self._transcript_examples(principle) + render_transcript(conversation)
        if self.config.critique:
            text += f"\n\nCritiqueRequest: {principle.critique_request}\n\nCritique: {critique}"
        return text + f"\n\nRevisionRequest: {principle.revision_request}\n\nRevision:"

    def _examples(self, principle: CritiquePrinciple) -> list[tuple[list[dict], str, str, str, str]]:
        """(conversation, critique request, critique, revision request, revision) for each example: the
        shared ones (--shots of them), then the drawn principle's own, closest to the real request."""
        if not self.config.few_shot:
            return []
        shared = self.constitution.few_shot
        if self.config.shots is not None and self.config.shots < len(shared):
            # One draw for the whole run: every request then starts with the same tokens, which the hf
            # engine computes once per batch.
            rng = random.Random(f"{self.config.seed}:shots")
            shared = [shared[i] for i in sorted(rng.sample(range(len(shared)), self.config.shots))]
        shots = [(s.messages, s.critique_request, s.critique, s.revision_request, s.revision) for s in shared]
        shots += [(e.messages, principle.critique_request, e.critique, principle.revision_request, e.revision)
                  for e in principle.examples]
        return shots

    def _with_examples(self, principle: CritiquePrinciple, chat: list[dict]) -> list[dict]:
        shown = []
        for conversation, critique_request, critique, revision_request, revision in self._examples(principle):
            shown += conversation
            if self.config.critique:
                shown += [{"role": "user", "content": critique_request}, {"role": "assistant", "content": critique}]
            shown += [{"role": "user", "content": revision_request}, {"role": "assistant", "content": revision}]
        # A system message stays first, ahead of the examples.
        if chat and chat[0]["role"] == "system":
            return chat[:1] + shown + chat[1:]
        return shown + chat

    def _transcript_examples(self, principle: CritiquePrinciple) -> str:
        text = ""
        for conversation, critique_request, critique, revision_request, revision in self._examples(principle):
            text += render_transcript(conversation)
            if self.config.critique:
                text += f"\n\nCritiqueRequest: {critique_request}\n\nCritique: {critique}"
            text += f"\n\nRevisionRequest: {revision_request}\n\nRevision: {revision}"
        return text


# Transcript stops: a base model that has finished its part goes on to write the next label.
# After a response, the few-shot transcripts go on to a critique request: stop there too.
STOP_INITIAL = STOP_RESPONSE + ("\n\nCritiqueRequest:",)
STOP_CRITIQUE = ("\n\nHuman:", "\n\nRevisionRequest:", "\n\nCritiqueRequest:", "\n\nRevision:")
STOP_REVISION = ("\n\nHuman:", "\n\nCritiqueRequest:", "\n\nRevisionRequest:")

_ROLE_PREFIX = re.compile(r"^\s*(?:assistant|ai|revision|revised response|critique)\s*:\s*", re.I)
_OPENER = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly|of course)[,.!]?\s*)?"
    r"here(?:'s| is)\s+(?:the|a|an|my)\s+(?:revised|rewritten|updated|improved|new|edited)\b[^\n:]{0,60}:\s*",
    re.I,
)


def clean_response(text: str) -> str:
    """Strip role prefixes ("Assistant:", "Revision:") and "Here is the revised response:"-style openers."""
    previous = None
    while previous != text:
        previous = text
        text = _OPENER.sub("", _ROLE_PREFIX.sub("", text))
    return text.strip()


def revision_flags(revision: str, critique: str, with_critique: bool, finish_reason: str) -> list[str]:
    flags = []
    if not revision:
        flags.append("empty_revision")
    elif with_critique and critique and _similar(revision, critique):
        flags.append("revision_copies_critique")
    if with_critique and not critique:
        flags.append("empty_critique")
    if finish_reason == "length":
        flags.append("revision_truncated")
    return flags


def _similar(a: str, b: str) -> bool:
    a, b = " ".join(a.lower().split()), " ".join(b.lower().split())
    return a == b or difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= 0.9


def to_hf_columns(record: dict) -> dict:
    """Hugging Face's cai-conversation-harmless columns: loads straight into TRL and alignment-handbook."""
    last = record["steps"][-1]
    conversation = record["messages"]
    return {
        "id": record["id"],
        "init_prompt": conversation[-1]["content"],
        "init_response": record["initial_response"],
        "critic_prompt": last.get("critique_request", ""),
        "critic_response": last.get("critique", ""),
        "revision_prompt": last["revision_request"],
        "revision_response": last["revision"],
        "prompt": conversation[-1]["content"],
        "messages": conversation + [{"role": "assistant", "content": record["response"]}],
        "chosen": conversation + [{"role": "assistant", "content": record["response"]}],
        "rejected": conversation + [{"role": "assistant", "content": record["initial_response"]}],
        "flags": record["flags"],
        "meta": record["meta"],
    }


def _settings(config: ReviseConfig, model: str, constitution: Constitution) -> dict:
    """What made these records; the fields a resumed run must match."""
    return {
        "stage": "revise",
        "model": model,
        "model_identity": model_identity.identity(model, config.engine),
        "engine": config.engine,
        "constitution": constitution.name,
        "constitution_hash": constitution.content_hash(),
        "rounds": config.rounds,
        "few_shot": config.few_shot,
        "shots": config.shots,
        "critique": config.critique,
        "prompt_style": config.prompt_style,
        "sampling": {"temperature": config.temperature, "top_p": config.top_p,
                     "max_new_tokens": config.max_new_tokens, "sampler": sampler(config.engine)},
        "seed": config.seed,
        "format": config.format,
        "shard": config.shard,
        "caictl_version": __version__,
    }


def _print_summary(summary: dict, rejects) -> None:
    rows = [
        ("out", summary["out"]),
        ("rounds", summary["rounds"]),
        ("principles", ", ".join(f"{k}: {v}" for k, v in summary["principle_counts"].items()) or "-"),
        ("flagged rows", summary["flagged_rows"]),
        ("flags", ", ".join(f"{k}: {v}" for k, v in summary["flag_counts"].items()) or "-"),
        ("prompts cut to fit the context", f"{summary['truncated_rows']} ({summary['truncated_tokens']:,} tokens)"),
        ("prompt tokens", f"{summary['prompt_tokens']:,}"),
    ]
    if rejects is not None and rejects.count:
        rows.append(("rejected rows in", rejects.path))
    print_summary("revise", summary, rows)
