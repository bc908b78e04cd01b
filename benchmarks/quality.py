"""Quality of split fine-tuning against centralized LoRA, and of the serving default
against the unsplit model, with 95% intervals.  Offline data only, fixed seeds.

Fine-tuning (one run per task x configuration x seed):
  * tasks: bbc-topic and tweet-sentiment (classification: accuracy of the label's first
    token), bbc-headline (article start -> headline: ROUGE-1/2/L of the greedy headline,
    `rouge-score`), chitchat (next-turn perplexity of the assistant turns);
  * configurations: `base` (no training), `centralized` (LoRA via `peft` on the whole
    `transformers` model) and `split` (`training.federation.run`, the code behind
    `fedsea-finetune`: embedded server runtime, batched mode, the edges averaging adapters
    every R steps or gradients every step) for every noise x cut x clients (1, or K with
    IID / by-label shards) x averaging asked for;
  * one budget for all: `--samples` training samples, each seen once, in `--samples /
    --batch` optimizer steps of `--batch` samples (K clients: --batch/K each per step),
    one learning-rate schedule over those steps.  Centralized (one per cut and client
    split) takes exactly the batches the split run's clients take (training.federation.
    client_batch, the mean of their losses) and starts from the split run's adapter at its
    cut, so split with 1 client at noise 0 differs from it only by clipping each side's
    gradient on its own (tests/test_benchmark_scripts.py checks the parity at two cuts, and
    K clients averaging gradients).  Centralized is also evaluated at each split noise.
Every model is scored by the same code: the unsplit model with the run's adapter and the
run's noise added at the cut (a hook on the last head block; the public template prefix
clean, as serving sends it), on the same validation examples.

Intervals (95%): `seed_ci` is a t-interval over the seeds' values (>= 2 seeds); `example_ci`
a percentile bootstrap over validation examples (resampled jointly for all seeds; for
gaps, paired: the same resample for both configurations).  The seed interval includes
training variance; the example interval only evaluation-sample variance.

Serving cost (`--serving N`): N few-shot queries per classification task (`--serving-tasks`)
and `--serving-chats` chat prompts through the real serving path (audit.tasks), the serving
default (noise, public template, pseudonyms) against the unsplit model: accuracy difference
with a paired bootstrap interval per task and over all their queries, and greedy agreement.

    nice -n 10 python benchmarks/quality.py --quick
    nice -n 10 python benchmarks/quality.py --tasks bbc-topic --noise 0 0.1 --clients 1 4 --seeds 0 1
    nice -n 10 python benchmarks/quality.py --serving 500 --tasks   # serving cost only
    nice -n 10 python benchmarks/quality.py --tasks --serving 1925 --serving-tasks bbc-topic bbc-lead
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from audit import tasks as audit_tasks
from fedsea_shared import defaults
from fedsea_shared.models import resolve_model
from fedsea_shared.noise import add_noise, public_prefix_ids, public_prefix_len
from fedsea_shared.protocol import LoraSpec, OptimSpec
from fedsea_shared.shard import Partition, edge_layers
from fedsea_shared.training import AdapterOptimizer, inject_lora, lora_parameters
from training.checkpoint import Checkpoints
from training.data import Example, build_dataset, padded, shard
from training.federation import FinetuneConfig, client_batch, run, steps_per_epoch

RESULTS = Path(__file__).parent / "results"
BOOTSTRAP = 2000
ADAPTER = "default"  # the centralized model's adapter: peft's own name


@dataclass(frozen=True)
class Task:
    data: str  # a training.data built-in
    kind: str  # classify | summarize | dialogue
    max_length: int
    metric: str  # the headline metric of the summary


TASKS = {
    "bbc-topic": Task("bbc-news", "classify", 128, "accuracy"),
    "tweet-sentiment": Task("tweet-sentiment", "classify", 128, "accuracy"),
    "bbc-headline": Task("bbc-headlines", "summarize", 256, "rougeL"),
    "chitchat": Task("chitchat", "dialogue", 256, "perplexity"),
}
# Metric -> (per-example numerator, denominator) keys and the transform of their ratio.
METRICS = {
    "accuracy": ("hit", "one", None), "loss": ("nll", "tokens", None), "perplexity": ("nll", "tokens", "exp"),
    "rouge1": ("rouge1", "one", None), "rouge2": ("rouge2", "one", None), "rougeL": ("rougeL", "one", None),
}
TASK_METRICS = {"classify": ("accuracy", "loss"), "summarize": ("rouge1", "rouge2", "rougeL", "loss"), "dialogue": ("perplexity",)}
POINTS = {"accuracy", "rouge1", "rouge2", "rougeL"}  # reported x100
HEADLINE_TOKENS = 24


@dataclass(frozen=True)
class Config:
    kind: str  # base | centralized | split
    noise: float = 0.0
    head: int = defaults.HEAD
    tail: int = defaults.TAIL
    clients: int = 1
    by_label: bool = False
    average: str = "adapters"  # what several clients' edges average (FinetuneConfig.average)

    @property
    def name(self) -> str:
        if self.kind == "base":
            return self.kind
        shards = "" if self.clients == 1 else ("-label" if self.by_label else "-iid")
        if self.kind == "centralized":  # one per cut and client split: the split runs' adapter and batches
            default_cut = (self.head, self.tail) == (defaults.HEAD, defaults.TAIL)
            cut = "" if default_cut else f"-h{self.head}t{self.tail}"
            # noise > 0: the same trained model, evaluated with that noise at the cut (noise
            # at inference only, as a split trained at noise 0 would serve)
            return (f"{self.kind}{cut}" + (f"-k{self.clients}{shards}" if self.clients > 1 else "")
                    + (f"-n{self.noise:g}" if self.noise else ""))
        shards += "-grads" if self.clients > 1 and self.average == "gradients" else ""
        return f"split-h{self.head}t{self.tail}-k{self.clients}{shards}-n{self.noise:g}"

    def reference(self, noise: float = 0.0) -> "Config":
        """The centralized run a split run is compared with: same cut, same clients' batches,
        evaluated at `noise` (0: centralized LoRA as it is; the split's noise: only the
        noise in training differs)."""
        return Config("centralized", noise, self.head, self.tail, self.clients, self.by_label)


@dataclass(frozen=True)
class Budget:
    samples: int
    batch: int
    lr: float
    rank: int
    fedavg_every: int
    valid: int
    grad_clip: float = 1.0
    valid_fraction: float = 0.1  # of the shuffled records held out; the same split for every configuration

    @property
    def steps(self) -> int:
        return self.samples // self.batch

    def lora(self) -> LoraSpec:
        return LoraSpec(rank=self.rank, alpha=2.0 * self.rank)

    def optim(self) -> OptimSpec:
        return OptimSpec(lr=self.lr, schedule="linear", total_steps=self.steps, grad_clip=self.grad_clip)


# ---- training --------------------------------------------------------------------------


def centralized_model(model_dir, lora: LoraSpec, head: int, tail: int, seed: int) -> LlamaForCausalLM:
    """The unsplit model with `peft` LoRA on every block, initialised as the split run
    initialises its edge (seed) and server (seed + 1) adapters at this cut."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    partition = Partition(model.config.num_hidden_layers, head, tail)
    inject_lora(model, lora, edge_layers(partition), ADAPTER, seed)
    inject_lora(model, lora, list(partition.server_layers), ADAPTER, seed + 1)
    return model


def train_centralized(model_dir, train: list[Example], budget: Budget, seed: int, pad_id: int,
                      cfg: Config) -> tuple[LlamaForCausalLM, float]:
    torch.manual_seed(seed)
    model = centralized_model(model_dir, budget.lora(), cfg.head, cfg.tail, seed)
    model.train()
    optim = budget.optim()
    opt = AdapterOptimizer(lora_parameters(model, ADAPTER), optim, optim.total_steps)
    # Each step takes the batches the split run's clients take at that step, and the mean of
    # their losses: the objective FedAvg and the batched server pass optimise.
    k, size = cfg.clients, budget.batch // cfg.clients
    shards = [shard(train, k, c, cfg.by_label) for c in range(k)]
    per_epoch = steps_per_epoch(len(train), k, size)
    started = time.perf_counter()
    for step in range(budget.steps):
        for c, examples in enumerate(shards):
            ids, mask, labels = padded(client_batch(examples, seed, c, step, size, per_epoch), pad_id)
            (model(input_ids=ids, attention_mask=mask, labels=labels).loss / k).backward()
        opt.micro_step()
    return model.eval(), time.perf_counter() - started


def train_split(model_dir, task: Task, cfg: Config, budget: Budget, seed: int, out: Path) -> tuple[LlamaForCausalLM, float]:
    """`fedsea-finetune`'s run; its own validation is cut to a few examples (every model is
    scored below by one evaluator)."""
    from peft import PeftModel

    if budget.batch % cfg.clients:
        raise ValueError(f"--batch {budget.batch} is not a multiple of {cfg.clients} clients")
    run_cfg = FinetuneConfig(
        data=task.data, out=str(out), model=str(model_dir), head=cfg.head, tail=cfg.tail, noise=cfg.noise, clients=cfg.clients,
        mode="batched", steps=budget.steps, batch_size=budget.batch // cfg.clients, max_length=task.max_length,
        lora=budget.lora(), optim=budget.optim(), fedavg_every=budget.fedavg_every, average=cfg.average, by_label=cfg.by_label,
        max_train=budget.samples, max_valid=4, valid_fraction=budget.valid_fraction, seed=seed, progress=False,
    )
    report = run(run_cfg)
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(out / "adapter")).eval(), report["train"]["seconds"]


def server_steps(out: Path, clients: int) -> int:
    """Optimizer steps the server's adapter took (its last checkpoint's counter): batched
    mode takes one per fused pass, so a client that missed the fuse window adds steps."""
    checkpoints = Checkpoints(out / "checkpoint")
    _, server = checkpoints.load(0, checkpoints.common_step(clients))
    return server.adapters[0].steps


# ---- evaluation ------------------------------------------------------------------------


def _blocks(model) -> torch.nn.ModuleList:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


class NoiseAtCut:
    """Adds the edge's noise to the last head block's output, as the split sends it: each
    row's public template prefix (`clean`: its positions, set per batch) stays un-noised,
    as the serving edge and fedsea-finetune send it."""

    def __init__(self, model, head: int, noise: float, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.noise = noise
        self.clean: list[slice] = []
        self.handle = None
        if noise > 0:
            self.handle = _blocks(model)[head - 1].register_forward_hook(
                lambda _m, _i, out: (self._noised(out[0]), *out[1:]) if isinstance(out, tuple) else self._noised(out))

    def _noised(self, hidden: torch.Tensor) -> torch.Tensor:
        noised = add_noise(hidden, self.noise, self.gen)
        if self.clean and hidden.shape[1] >= max(r.stop for r in self.clean):  # the prompt's pass, not a decode step
            for row, positions in enumerate(self.clean):
                noised[row, positions] = hidden[row, positions]
        return noised

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


@torch.no_grad()
def evaluate(model, task: Task, valid: list[Example], labels: list[str] | None, tok, noise: float, head: int, seed: int,
             batch_size: int = 16) -> dict[str, list[float]]:
    """Per-example scores, in `valid`'s order: target-token NLL and count, and the task's
    metric.  Batches of similar length (less padding); the LM head runs only on the rows
    that are scored."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    labels_first = {n: tok(n, add_special_tokens=False).input_ids[0] for n in labels} if task.kind == "classify" else {}
    choices = torch.tensor(list(labels_first.values()))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    scores: dict[str, list[float]] = {"nll": [0.0] * len(valid), "tokens": [0.0] * len(valid), "one": [1.0] * len(valid)}
    if labels_first:
        scores["hit"] = [0.0] * len(valid)
    order = sorted(range(len(valid)), key=lambda i: len(valid[i].ids))
    public = public_prefix_ids(tok) if defaults.PUBLIC_TEMPLATE else []
    with NoiseAtCut(model, head, noise, seed + 12345) as at_cut:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = [valid[i] for i in rows]
            at_cut.clean = [slice(0, public_prefix_len(ex.ids, public)) for ex in batch]  # right-padded rows
            ids, mask, target = padded(batch, pad_id)
            hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
            for r, (i, ex) in enumerate(zip(rows, batch)):
                at = (target[r, 1:] != -100).nonzero().squeeze(1)
                logits = base.lm_head(hidden[r, torch.cat([at, torch.tensor([ex.prompt_len - 1])])]).float()
                scores["nll"][i] = F.cross_entropy(logits[:-1], target[r, at + 1], reduction="sum").item()
                scores["tokens"][i] = float(len(at))
                if labels_first:
                    scores["hit"][i] = float(list(labels_first)[logits[-1, choices].argmax().item()] == ex.label)
        if task.kind == "summarize":
            scores.update(_rouge(model, valid, tok, pad_id, batch_size, at_cut, public))
    return scores


def _rouge(model, valid: list[Example], tok, pad_id: int, batch_size: int, at_cut: NoiseAtCut,
           public: list[int]) -> dict[str, list[float]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for i in range(0, len(valid), batch_size):
        batch = valid[i : i + batch_size]
        longest = max(ex.prompt_len for ex in batch)
        ids = torch.full((len(batch), longest), pad_id)
        mask = torch.zeros_like(ids)
        for r, ex in enumerate(batch):  # left-padded prompts
            ids[r, longest - ex.prompt_len :] = torch.tensor(ex.ids[: ex.prompt_len])
            mask[r, longest - ex.prompt_len :] = 1
        pad = [longest - ex.prompt_len for ex in batch]
        at_cut.clean = [slice(p, p + public_prefix_len(ex.ids[: ex.prompt_len], public)) for p, ex in zip(pad, batch)]
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=HEADLINE_TOKENS, do_sample=False, pad_token_id=pad_id)
        for r, ex in enumerate(batch):
            guess = tok.decode(gen[r, longest:], skip_special_tokens=True).strip()
            truth = tok.decode([t for t, m in zip(ex.ids, ex.target) if m], skip_special_tokens=True).strip()
            for k, s in scorer.score(truth, guess).items():
                out[k].append(s.fmeasure)
    return out


# ---- intervals -------------------------------------------------------------------------

# t quantiles (0.975) for 1..30 degrees of freedom; above: the normal's.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values: list[float]) -> list[float] | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def _value(metric: str, per_seed: list[dict[str, list[float]]], idx: torch.Tensor | None = None) -> torch.Tensor:
    """The metric over all seeds' examples; with idx [R, n], one value per resample."""
    num_key, den_key, transform = METRICS[metric]
    num = torch.tensor([s[num_key] for s in per_seed], dtype=torch.float64)  # [seeds, n]
    den = torch.tensor([s[den_key] for s in per_seed], dtype=torch.float64)
    if idx is not None:
        num, den = num[:, idx], den[:, idx]  # [seeds, R, n]
    value = num.sum((0, -1)) / den.sum((0, -1))
    return value.exp() if transform == "exp" else value


def _scale(metric: str) -> float:
    return 100.0 if metric in POINTS else 1.0


def summarize(metric: str, runs: list[dict], reference: list[dict] | None, seed: int = 0) -> dict:
    """Mean over seeds with both intervals; with `reference` (the centralized runs of the
    same seeds), the gap to it too."""
    scale = _scale(metric)
    per_seed = [r["scores"] for r in runs]
    n = len(per_seed[0]["one"])
    idx = torch.randint(0, n, (BOOTSTRAP, n), generator=torch.Generator().manual_seed(seed))

    def ci(samples: torch.Tensor) -> list[float]:
        return [round(scale * samples.quantile(q).item(), 4) for q in (0.025, 0.975)]

    def seed_ci(values: list[float]) -> list[float] | None:
        got = t_interval(values)
        return None if got is None else [round(scale * v, 4) for v in got]

    values = [_value(metric, [s]).item() for s in per_seed]
    out = {"metric": metric, "mean": round(scale * sum(values) / len(values), 4), "per_seed": [round(scale * v, 4) for v in values],
           "seed_ci": seed_ci(values), "example_ci": ci(_value(metric, per_seed, idx))}
    if reference is not None:
        ref = [r["scores"] for r in reference]
        gaps = [v - _value(metric, [s]).item() for v, s in zip(values, ref)]
        out["gap_vs_centralized"] = {"mean": round(scale * sum(gaps) / len(gaps), 4), "seed_ci": seed_ci(gaps),
                                     "example_ci": ci(_value(metric, per_seed, idx) - _value(metric, ref, idx))}
    return out


def binomial_upper(k: int, n: int, alpha: float = 0.025) -> float:
    """Clopper-Pearson upper bound of a rate seen k times in n: the p with P(X <= k) = alpha."""
    if k >= n:
        return 1.0

    def cdf(p: float) -> float:
        return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
                            + (n - i) * math.log1p(-p)) for i in range(k + 1))

    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > alpha else (lo, mid)
    return hi


# ---- the serving default ---------------------------------------------------------------


def serving_cost(model: str, queries: int, chats: int, task_names: tuple[str, ...], seed: int) -> dict:
    """The serving default against the unsplit model through the real serving path; with
    pseudonyms in the default, also its noise alone (the same split, noise and template,
    pseudonyms off), so that each part's cost shows."""
    from audit.frontier import serving_default

    default = serving_default()
    p = audit_tasks.prompts(queries, chats, seed, task_names)
    started = time.perf_counter()
    servings = [audit_tasks.Serving(0.0),
                audit_tasks.Serving(default.noise, default.public_template, pseudonymize=default.pseudonymize)]
    if default.pseudonymize:
        servings.append(audit_tasks.Serving(default.noise, default.public_template))
    unsplit, served, *noise_only = audit_tasks.measure(model, default.head, defaults.TAIL, servings, p)
    out = {"setting": default.model_dump(), "chat_prompts": len(p.chat),
           "seconds": time.perf_counter() - started}
    g = torch.Generator().manual_seed(seed)

    def paired(a: list[bool], b: list[bool]) -> dict:
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        idx = torch.randint(0, len(a), (BOOTSTRAP, len(a)), generator=g)
        diff = b[idx].mean(1) - a[idx].mean(1)
        changed = int((a != b).sum())
        return {"queries": len(a), "unsplit": 100 * a.mean().item(), "served": 100 * b.mean().item(),
                "delta": 100 * (b.mean() - a.mean()).item(),
                "delta_ci": [100 * diff.quantile(q).item() for q in (0.025, 0.975)],
                "correctness_changed": changed,
                # |delta| is at most the share of queries whose correctness changed; unlike
                # the bootstrap, this bound does not collapse when none did.
                "abs_delta_upper": 100 * binomial_upper(changed, len(a))}

    def against_unsplit(utility) -> dict:
        tasks = {task: paired(unsplit.hits[task], utility.hits[task]) for task in unsplit.hits}
        if len(tasks) > 1:  # every query of every task, paired: the interval the target asks of
            tasks["pooled"] = paired(sum(unsplit.hits.values(), []), sum(utility.hits.values(), []))
        return tasks

    out["serving_default"] = against_unsplit(served)
    if noise_only:
        out["noise_only"] = against_unsplit(noise_only[0])
    # Per query, in prompts() order: which configuration answered it right.
    out["hits"] = {name: {t: [int(h) for h in u.hits[t]] for t in u.hits}
                   for name, u in zip(("unsplit", "serving_default", "noise_only"), (unsplit, served, *noise_only))}
    if p.chat:
        agreement = torch.tensor(served.agreement_per_prompt(unsplit), dtype=torch.float64)
        idx = torch.randint(0, len(agreement), (BOOTSTRAP, len(agreement)), generator=g)
        out["greedy_agreement"] = {"mean": agreement.mean().item(),
                                   "ci": [agreement[idx].mean(1).quantile(q).item() for q in (0.025, 0.975)]}
    return out


# ---- driver ----------------------------------------------------------------------------


def grid(args) -> list[Config]:
    cuts = [tuple(int(x) for x in cut.split("/")) for cut in args.cuts]
    configs = [Config("base")] if "base" in args.baselines else []
    splits = [(k, by_label) for k in args.clients for by_label in ([False] if k == 1 else [s == "label" for s in args.sharding])]
    if "centralized" in args.baselines:
        noises = [0.0] + [n for n in args.noise if n > 0]
        configs += [Config("centralized", noise, head, tail, k, by_label)
                    for head, tail in cuts for k, by_label in splits for noise in noises]
    for noise in args.noise:
        for head, tail in cuts:
            for k, by_label in splits:
                for average in (["adapters"] if k == 1 else args.average):
                    configs.append(Config("split", noise, head, tail, k, by_label, average))
    return configs


def run_task(name: str, task: Task, configs: list[Config], budget: Budget, seeds: list[int], model_dir: Path, log,
             runs: list[dict], save, kept: list[Config]) -> dict:
    """Every (configuration, seed) not yet in `runs` (a resumed file's), calling save(result)
    after each, so an interrupted grid keeps what it measured; `kept`: configurations of
    `runs` that are summarized but not run."""
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    done = {(r["config"], r["seed"]) for r in runs}
    for seed in seeds:
        ds = build_dataset(task.data, tok, task.max_length, seed, budget.valid_fraction, budget.samples, budget.valid)
        centralized: dict[Config, tuple] = {}  # this seed's trained models, evaluated at every noise
        for cfg in configs:
            if (cfg.name, seed) in done:
                continue
            started, extra = time.perf_counter(), {}
            work = Path(tempfile.mkdtemp(prefix="fedsea-quality-"))
            try:
                if cfg.kind == "base":
                    model, train_s = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), 0.0
                elif cfg.kind == "centralized":
                    trained = replace(cfg, noise=0.0)
                    if trained not in centralized:
                        centralized[trained] = train_centralized(model_dir, ds.train, budget, seed, pad_id, cfg)
                    model, train_s = centralized[trained]
                else:
                    model, train_s = train_split(model_dir, task, cfg, budget, seed, work / "run")
                    extra["server_steps"] = server_steps(work / "run", cfg.clients)
                scores = evaluate(model, task, ds.valid, ds.labels, tok, cfg.noise, cfg.head, seed)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            row = {"config": cfg.name, "seed": seed, "train_seconds": round(train_s, 1),
                   "wall_seconds": round(time.perf_counter() - started, 1), **extra, "scores": scores}
            row["values"] = {m: _value(m, [scores]).item() * _scale(m) for m in TASK_METRICS[task.kind]}
            runs.append(row)
            log(f"{name} {cfg.name} seed {seed}: " + ", ".join(f"{m} {v:.3f}" for m, v in row["values"].items())
                + f" ({row['wall_seconds']:.0f} s{', server steps %d' % extra['server_steps'] if extra else ''})")
            save(task_result(task, configs + kept, runs))
    return task_result(task, configs + kept, runs)


def task_result(task: Task, configs: list[Config], runs: list[dict]) -> dict:
    summary = {}
    for cfg in configs:
        mine = sorted((r for r in runs if r["config"] == cfg.name), key=lambda r: r["seed"])
        if not mine:
            continue
        reference = cfg.reference().name
        ref = {r["seed"]: r for r in runs if r["config"] == reference}
        if cfg.kind == "split" and all(r["seed"] in ref for r in mine):
            ref_runs = [ref[r["seed"]] for r in mine]
        else:
            ref_runs = None
        summary[cfg.name] = {"config": asdict(cfg), "seeds": [r["seed"] for r in mine],
                             **{m: summarize(m, mine, ref_runs) for m in TASK_METRICS[task.kind]}}
        # Against centralized evaluated at the same noise: what training with the noise costs.
        same = {r["seed"]: r for r in runs if r["config"] == cfg.reference(cfg.noise).name}
        if cfg.kind == "split" and cfg.noise > 0 and all(r["seed"] in same for r in mine):
            summary[cfg.name]["gap_vs_centralized_at_same_noise"] = {
                m: summarize(m, mine, [same[r["seed"]] for r in mine])["gap_vs_centralized"] for m in TASK_METRICS[task.kind]}
    return {"task": asdict(task), "valid_examples": len(runs[0]["scores"]["one"]) if runs else 0, "summary": summary, "runs": runs}


def table(name: str, result: dict) -> str:
    metric = TASKS[name].metric if name in TASKS else "accuracy"
    lines = [f"\n{name}: {metric} (95% intervals: seeds t / examples bootstrap), gap = split - centralized "
             "(same noise: centralized evaluated with the split's noise)",
             f"{'config':<30}{'mean':>8}  {'seed CI':>16}  {'example CI':>16}  {'gap':>7}  {'gap example CI':>16}"
             f"  {'same noise':>10}  {'example CI':>16}"]

    def fmt(ci):
        return "-" if ci is None else f"[{ci[0]:.1f}, {ci[1]:.1f}]"

    for cname, s in result["summary"].items():
        m = s[metric]
        gap = m.get("gap_vs_centralized")
        same = s.get("gap_vs_centralized_at_same_noise", {}).get(metric)
        lines.append(f"{cname:<30}{m['mean']:>8.2f}  {fmt(m['seed_ci']):>16}  {fmt(m['example_ci']):>16}  "
                     + (f"{gap['mean']:>+7.2f}  {fmt(gap['example_ci']):>16}" if gap else "")
                     + (f"  {same['mean']:>+10.2f}  {fmt(same['example_ci']):>16}" if same else ""))
    return "\n".join(lines)


def plot(name: str, result: dict, path: Path) -> None:
    """The metric against the noise at one cut, or, when several cuts were measured,
    against the cut (one series per noise level, centralized LoRA as a series of its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = TASKS[name].metric
    trained = [s for s in result["summary"].values() if s["config"]["kind"] != "base"]
    cuts = sorted({(s["config"]["head"], s["config"]["tail"]) for s in trained})
    by_cut = len(cuts) > 1
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[float, dict]]] = {}
    for s in trained:
        c = s["config"]
        if c["kind"] == "centralized":
            batches = "" if c["clients"] == 1 else f", {c['clients']} clients' batches"
            if by_cut and not c["noise"]:
                series.setdefault(f"centralized{batches}", []).append((cuts.index((c["head"], c["tail"])), s[metric]))
            elif not by_cut and any(t["config"]["kind"] == "centralized" and t["config"]["noise"] for t in trained):
                series.setdefault(f"centralized{batches}, noise at evaluation only", []).append((c["noise"], s[metric]))
            continue
        label = f"split, {c['clients']} client" + ("s" if c["clients"] > 1 else "")
        label += "" if c["clients"] == 1 else (" by label" if c["by_label"] else " IID")
        label += ", averaging gradients" if c.get("average") == "gradients" else ""
        if by_cut:
            series.setdefault(f"{label}, noise {c['noise']:g}", []).append((cuts.index((c["head"], c["tail"])), s[metric]))
        else:
            series.setdefault(f"{label}, cut {c['head']}/{c['tail']}", []).append((c["noise"], s[metric]))
    shift = 0.06 if by_cut else 0.0  # side by side at each cut, so the intervals do not hide each other
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts.sort(key=lambda p: p[0])
        xs = [p[0] + shift * (i - (len(series) - 1) / 2) for p in pts]
        ys = [p[1]["mean"] for p in pts]
        err = [[y - p[1]["example_ci"][0] for y, p in zip(ys, pts)], [p[1]["example_ci"][1] - y for y, p in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    horizontal = [("base", ":")] + ([] if by_cut else [("centralized", "-")])
    for kind, style in horizontal:
        if kind in result["summary"]:
            m = result["summary"][kind][metric]
            ax.axhline(m["mean"], color="k", linestyle=style, label=kind)
            ax.axhspan(*m["example_ci"], color="k", alpha=0.08)
    if by_cut:
        ax.set_xticks(range(len(cuts)), [f"{h}/{t}" for h, t in cuts])
        ax.set_xlabel("cut (edge blocks head/tail)")
    else:
        ax.set_xlabel("noise (relative to per-token RMS)")
    ax.set_ylabel(metric + (" (points)" if metric in POINTS else ""))
    ax.set_title(f"{name}: split vs centralized LoRA (95% example bootstrap)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=defaults.MODEL)
    p.add_argument("--tasks", nargs="*", default=["bbc-topic"], choices=list(TASKS))
    p.add_argument("--noise", type=float, nargs="*", default=[0.0, defaults.NOISE], help="split noise levels (default: %(default)s)")
    p.add_argument("--cuts", nargs="+", default=[f"{defaults.HEAD}/{defaults.TAIL}"], help="head/tail blocks, e.g. 1/1 2/2 4/4")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    p.add_argument("--sharding", nargs="+", default=["iid"], choices=["iid", "label"], help="shards of multi-client runs")
    p.add_argument("--average", nargs="+", default=["adapters"], choices=["adapters", "gradients"],
                   help="what multi-client runs' edges average (fedsea-finetune --average)")
    p.add_argument("--baselines", nargs="*", default=["base", "centralized"], choices=["base", "centralized"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--samples", type=int, default=160, help="training samples, all clients together, each seen once")
    p.add_argument("--batch", type=int, default=8, help="samples per optimizer step, all clients together")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--fedavg-every", type=int, default=5)
    p.add_argument("--grad-clip", type=float, default=OptimSpec().grad_clip,
                   help="max gradient norm (split: each side clips its own; 0: off, which makes 1-client split = centralized)")
    p.add_argument("--valid", type=int, default=200, help="validation examples (the same for every configuration)")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="records held out for validation (BBC has 2225: raise this for more than 222 validation examples)")
    p.add_argument("--serving", type=int, default=0, help="few-shot queries per task for the serving default's cost (0: skip)")
    p.add_argument("--serving-tasks", nargs="+", default=list(audit_tasks.DEFAULT_TASKS), choices=list(audit_tasks.TASKS),
                   help="few-shot tasks of --serving (bbc-lead: the BBC articles again, classified from their lead)")
    p.add_argument("--serving-chats", type=int, default=125, help="chat prompts of --serving, for greedy agreement")
    p.add_argument("--quick", action="store_true", help="minutes: bbc-topic, noise 0 and default, 1 client, 1 seed, 64 samples")
    p.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    p.add_argument("--plot", action="store_true", help="one PNG per task next to --out")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out (same budget) and measure only the missing ones")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.seeds, args.samples, args.valid = [1], [0], 64, 100
    model_dir = resolve_model(args.model)
    budget = Budget(args.samples, args.batch, args.lr, args.rank, args.fedavg_every, args.valid, args.grad_clip, args.valid_fraction)
    if budget.steps < 1:
        raise SystemExit("--samples must be at least --batch")
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    results = {"machine": f"{platform.node()} ({torch.get_num_threads()} torch threads), torch {torch.__version__}",
               "model": args.model, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "budget": {**asdict(budget), "steps": budget.steps, "schedule": "linear", "lora_alpha": 2.0 * budget.rank},
               "intervals": "95%: seed_ci = t-interval over seeds; example_ci = bootstrap over validation examples "
                            f"({BOOTSTRAP} resamples, paired for gaps)",
               "tasks": {}}
    configs = grid(args)
    previous = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else None
    if previous is not None and previous["budget"] != results["budget"]:
        raise SystemExit(f"--resume: {args.out} was measured with another budget ({previous['budget']})")

    def save(name: str, result: dict) -> None:
        results["tasks"][name] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    if previous is not None:  # keep its other tasks and configurations too
        results["tasks"] = previous["tasks"]
    for name in args.tasks:
        done = results["tasks"].get(name, {}).get("runs", [])
        known = {Config(**s["config"]) for s in results["tasks"].get(name, {}).get("summary", {}).values()}
        result = run_task(name, TASKS[name], configs, budget, args.seeds, model_dir, log, done,
                          lambda r, name=name: save(name, r), sorted(known - set(configs), key=lambda c: c.name))
        save(name, result)
        print(table(name, result), flush=True)
    if args.serving:
        results["serving"] = s = serving_cost(args.model, args.serving, args.serving_chats,
                                               tuple(args.serving_tasks), args.seeds[0])
        for name in ("serving_default", "noise_only"):
            for task, t in s.get(name, {}).items():
                print(f"{name.replace('_', ' ')}, {task}: {t['served']:.1f} vs unsplit {t['unsplit']:.1f} "
                      f"(delta {t['delta']:+.1f}, 95% [{t['delta_ci'][0]:+.1f}, {t['delta_ci'][1]:+.1f}], |delta| <= "
                      f"{t['abs_delta_upper']:.1f}; {t['correctness_changed']} of {t['queries']} changed)")
        if g := s.get("greedy_agreement"):
            print(f"greedy agreement {g['mean']:.3f} [{g['ci'][0]:.3f}, {g['ci'][1]:.3f}] over {s['chat_prompts']} chats")
    results["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {args.out}")
    if args.plot:
        for name, result in results["tasks"].items():
            path = args.out.with_name(f"{args.out.stem}_{name}.png")
            plot(name, result, path)
            log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
