"""Math word problems: the `Problem` record, JSONL loading with file:line errors, dataset names, and
a built-in generator of arithmetic word problems (the embedded default dataset).

    mdlite data synth -n 200 --seed 0 -o problems.jsonl
    mdlite data check problems.jsonl
    mdlite data stats svamp:test --data-dir ../shared/data

A problem source is a JSONL path, `synth:N[:SEED]` (N generated problems), or `NAME[:SPLIT]` for
NAME in svamp, gsm8k, asdiv, multiarith (split defaults to test), read from
`<data_dir>/<NAME>/<SPLIT>.jsonl` with data_dir from
`--data-dir`, else `$MDLITE_DATA`, else `~/.cache/mdlite/data`; without a local copy the dataset
is loaded from the Hugging Face hub.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from mdlite import MdliteError, mdlite_home
from mdlite.answers import format_number

log = logging.getLogger(__name__)

DATASETS = {
    # name: (Hugging Face hub id, hub config, {our split: hub split})
    "svamp": ("ChilleD/SVAMP", None, {"train": "train", "test": "test"}),
    "gsm8k": ("openai/gsm8k", "main", {"train": "train", "test": "test"}),
    "asdiv": ("EleutherAI/asdiv", None, {"test": "validation"}),
    "multiarith": ("ChilleD/MultiArith", None, {"train": "train", "test": "test"}),
}
MAX_LINE_BYTES = 1 << 20


@dataclass(frozen=True)
class Problem:
    """One math word problem with its gold numeric answer."""

    id: str
    question: str
    answer: float
    equation: str | None = None

    def to_json(self) -> str:
        record = asdict(self)
        if float(self.answer).is_integer():
            record["answer"] = int(self.answer)
        return json.dumps(record, ensure_ascii=False)


def problem_hash(problem: Problem) -> str:
    """16 hex digits of blake2b over the question, a newline and the gold (`repr(float)`): resumed records
    of `mdlite teach` and `mdlite eval` carry it, so a problem whose question or answer changed is redone."""
    text = f"{problem.question}\n{float(problem.answer)!r}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def default_data_dir() -> Path:
    """`$MDLITE_DATA`, else `$MDLITE_HOME/data` (default `~/.cache/mdlite/data`)."""
    if os.environ.get("MDLITE_DATA"):
        return Path(os.environ["MDLITE_DATA"])
    return mdlite_home() / "data"


def load_problems(
    source: str | Path, *, data_dir: str | Path | None = None, limit: int | None = None
) -> list[Problem]:
    """Problems from a JSONL file, `synth:N[:SEED]` or a dataset name (`svamp:test`); MdliteError on bad input."""
    if str(source).startswith("synth:"):
        count, seed = _synth_spec(str(source))
        return synth_problems(count, seed=seed)[:limit]
    path = resolve_source(source, data_dir=data_dir)
    problems = read_jsonl_problems(path) if path is not None else _load_from_hub(str(source), data_dir)
    return problems[:limit] if limit is not None else problems


def _synth_spec(source: str) -> tuple[int, int]:
    parts = source.split(":")[1:]
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1:
        raise MdliteError(f"{source}: expected synth:N or synth:N:SEED with whole numbers, e.g. synth:200:0")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0


def resolve_source(source: str | Path, *, data_dir: str | Path | None = None) -> Path | None:
    """The local file behind a source; None when a named dataset has no local copy."""
    text = str(source)
    name, _, split = text.partition(":")
    if name.lower() in DATASETS and not Path(text).exists():
        split = split or "test"
        folder = Path(data_dir) if data_dir else default_data_dir()
        if data_dir and not folder.is_dir():
            raise MdliteError(f"{folder}: no such folder (flag --data-dir)")
        path = folder / name.lower() / f"{split}.jsonl"
        return path if path.exists() else None
    path = Path(text)
    if not path.is_file():
        raise MdliteError(
            f"{path}: {'is a folder' if path.is_dir() else 'no such file'}; give a JSONL file of problems or a "
            f"dataset name ({', '.join(DATASETS)}, e.g. svamp:test)"
        )
    return path


def read_jsonl_problems(path: Path) -> list[Problem]:
    """Parse and validate a JSONL problem file; every error names `path:line` and the fix."""
    raw = path.read_bytes()
    if not raw.strip():
        raise MdliteError(f"{path}: the file is empty; expected one JSON problem per line")
    if b"\0" in raw[:65536]:
        raise MdliteError(f"{path}: this is a binary file, not JSONL text")
    problems: list[Problem] = []
    first_line_of: dict[str, int] = {}
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{number}"
        if len(line) > MAX_LINE_BYTES:
            raise MdliteError(f"{where}: line is {len(line):,} bytes, over the 1 MiB limit")
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise MdliteError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
        except json.JSONDecodeError as error:
            raise MdliteError(f"{where}: broken JSON ({error.msg}); one object per line") from None
        problem = _problem_from_record(record, where)
        if problem.id in first_line_of:
            raise MdliteError(
                f"{where}: duplicate id {problem.id!r} (first on line {first_line_of[problem.id]}); "
                "ids must be unique"
            )
        first_line_of[problem.id] = number
        problems.append(problem)
    return problems


def write_problems(problems: list[Problem], path: Path) -> None:
    """Write problems as JSONL, atomically (temporary name, then rename)."""
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("".join(p.to_json() + "\n" for p in problems), encoding="utf-8")
        partial.replace(path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise MdliteError(f"{path}: cannot write the problem file ({error.strerror})") from None


def problem_stats(problems: list[Problem]) -> dict:
    """Counts, answer range and duplicate questions of a problem list."""
    answers = [p.answer for p in problems]
    questions = Counter(" ".join(p.question.lower().split()) for p in problems)
    return {
        "problems": len(problems),
        "with_equation": sum(p.equation is not None for p in problems),
        "integer_answers": sum(float(a).is_integer() for a in answers),
        "answer_min": min(answers),
        "answer_max": max(answers),
        "answer_mean": sum(answers) / len(answers),
        "question_words_mean": sum(len(p.question.split()) for p in problems) / len(problems),
        "duplicate_questions": sum(n - 1 for n in questions.values() if n > 1),
    }


def evaluate_equation(equation: str) -> Fraction:
    """Exact value of an arithmetic expression of numbers, + - * / and parentheses."""
    return _eval_node(ast.parse(equation, mode="eval").body)


# ---- synthetic problems -------------------------------------------------------------------------

_PEOPLE = [
    ("Maria", "she"), ("Tom", "he"), ("Aisha", "she"), ("Kenji", "he"), ("Lena", "she"),
    ("Omar", "he"), ("Priya", "she"), ("Lucas", "he"), ("Sofia", "she"), ("Daniel", "he"),
    ("Mei", "she"), ("Carlos", "he"), ("Emma", "she"), ("Noah", "he"), ("Zara", "she"),
]
# (plural item, container, gain verbs, loss verbs)
_ITEMS = [
    ("apples", "baskets", ["picks", "buys"], ["eats", "gives away"]),
    ("pencils", "boxes", ["buys", "finds"], ["lends out", "loses"]),
    ("marbles", "bags", ["wins", "is given"], ["loses", "trades away"]),
    ("stickers", "sheets", ["collects", "buys"], ["uses", "gives away"]),
    ("cookies", "trays", ["bakes", "buys"], ["eats", "sells"]),
    ("books", "shelves", ["buys", "borrows"], ["donates", "sells"]),
    ("seashells", "jars", ["collects", "finds"], ["gives away", "breaks"]),
    ("liters of juice", "bottles", ["makes", "buys"], ["drinks", "pours out"]),
    ("meters of rope", "coils", ["buys", "is given"], ["cuts off", "uses"]),
    ("kilograms of flour", "sacks", ["buys", "receives"], ["uses", "sells"]),
]
_PRICED = [("notebooks", ["1.25", "2.5", "3.75", "4"]), ("tickets", ["2.5", "6", "7.5", "12"]),
           ("sandwiches", ["3.5", "4.25", "5"]), ("pens", ["0.75", "1.5", "2"])]
_SPLIT_DIVISORS = [2, 3, 4, 5, 8, 10]  # uncountable items (' of ') may split into decimals


def synth_problems(n: int, *, seed: int = 0) -> list[Problem]:
    """`n` checked arithmetic word problems (1-4 operations), deterministic by `seed`."""
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < n:
        question, equation = _synth_one(rng)
        if question in seen:
            continue
        value = evaluate_equation(equation)
        if value < 0 or not _is_exact_decimal(value):
            continue
        seen.add(question)
        answer = float(value)
        assert Fraction(format_number(answer)) == value, (question, equation)
        problems.append(Problem(f"synth-{seed}-{len(problems)}", question, answer, equation))
    return problems


def _synth_one(rng: random.Random) -> tuple[str, str]:
    name, pronoun = rng.choice(_PEOPLE)
    subject = pronoun.capitalize()
    if rng.random() < 0.3:
        return _synth_money(rng, name, subject)
    item, container, gains, losses = rng.choice(_ITEMS)
    n_ops = rng.randint(1, 4)
    if rng.random() < 0.4:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        sentences = [f"{name} has {a} {container} with {b} {item} in each."]
        expr, value, ops = f"{a} * {b}", a * b, 1
    else:
        a = rng.randint(5, 60)
        sentences, expr, value, ops = [f"{name} has {a} {item}."], str(a), a, 0
    divide = n_ops > ops and rng.random() < 0.35
    while ops < n_ops - divide:
        kind = rng.choice(["add", "sub", "mul"] if value < 200 else ["add", "sub"])
        if kind == "add":
            b = rng.randint(2, 40)
            sentences.append(f"{subject} {rng.choice(gains)} {b} more {item}.")
            expr, value = f"({expr} + {b})", value + b
        elif kind == "sub" and value > 2:
            b = rng.randint(1, value - 1)
            sentences.append(f"Then {pronoun} {rng.choice(losses)} {b} {item}.")
            expr, value = f"({expr} - {b})", value - b
        elif kind == "mul":
            k = rng.choice([2, 3, 4])
            word = {2: "doubles", 3: "triples", 4: "quadruples"}[k]
            sentences.append(f"Later {pronoun} {word} the number of {item} {pronoun} has.")
            expr, value = f"({expr} * {k})", value * k
        else:
            continue
        ops += 1
    if divide:
        divisors = [k for k in _SPLIT_DIVISORS if " of " in item or value % k == 0]
        if not divisors:
            return _synth_one(rng)
        k = rng.choice(divisors)
        sentences.append(f"{subject} splits all of the {item} equally into {k} {container}.")
        question = f"How many {item} are in each of the {container}?"
        expr = f"{expr} / {k}"
    else:
        question = f"How many {item} does {name} have now?"
    return " ".join(sentences) + " " + question, _strip_outer(expr)


def _synth_money(rng: random.Random, name: str, subject: str) -> tuple[str, str]:
    item, prices = rng.choice(_PRICED)
    count, price = rng.randint(2, 9), rng.choice(prices)
    sentences = [f"{name} buys {count} {item} for ${_money(price)} each."]
    expr = f"{count} * {price}"
    if rng.random() < 0.5:
        fee = rng.choice(["1.5", "2", "3.25", "5"])
        sentences.append(f"{subject} also pays a ${_money(fee)} delivery fee.")
        expr = f"({expr} + {fee})"
    if rng.random() < 0.5:
        budget = int(evaluate_equation(expr)) + rng.randint(5, 50)
        sentences.insert(0, f"{name} has ${budget}.")
        return " ".join(sentences) + f" How many dollars does {name} have left?", f"{budget} - {expr}"
    return " ".join(sentences) + " How many dollars does " + name + " spend in total?", _strip_outer(expr)


def _money(amount: str) -> str:
    return amount if "." not in amount else f"{float(amount):.2f}"


def _strip_outer(expr: str) -> str:
    if expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, char in enumerate(expr):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0 and i < len(expr) - 1:
                return expr
        return expr[1:-1]
    return expr


def _is_exact_decimal(value: Fraction) -> bool:
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def _eval_node(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval_node(node.operand)
    if isinstance(node, ast.BinOp):
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise ValueError("division by zero")
            return left / right
    raise ValueError(f"unsupported expression: {ast.dump(node)[:80]}")


# ---- JSONL records and the hub -------------------------------------------------------------------


def _problem_from_record(record: object, where: str) -> Problem:
    if not isinstance(record, dict):
        raise MdliteError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("id", "question", "answer") if key not in record]
    if missing:
        raise MdliteError(f"{where}: missing field(s) {', '.join(missing)}; "
                          "each line needs id, question and answer")
    answer = record["answer"]
    if isinstance(answer, str):
        try:
            answer = float(answer.replace(",", ""))
        except ValueError:
            pass
    if isinstance(answer, bool) or not isinstance(answer, (int, float)) or not math.isfinite(answer):
        raise MdliteError(f"{where}: answer {record['answer']!r} is not a finite number")
    if not isinstance(record["question"], str) or not record["question"].strip():
        raise MdliteError(f"{where}: question must be a non-empty string")
    equation = record.get("equation")
    if equation is not None and not isinstance(equation, str):
        raise MdliteError(f"{where}: equation must be a string or null")
    return Problem(str(record["id"]), record["question"].strip(), float(answer), equation)


def _load_from_hub(source: str, data_dir: str | Path | None) -> list[Problem]:
    name, _, split = source.lower().partition(":")
    split = split or "test"
    hub_id, hub_config, splits = DATASETS[name]
    hint = (f"put a local copy at <data_dir>/{name}/{split}.jsonl and pass --data-dir "
            f"(or set MDLITE_DATA); looked in {Path(data_dir) if data_dir else default_data_dir()}")
    if split not in splits:
        raise MdliteError(f"{source}: {name} has no split {split!r} (have {', '.join(splits)})")
    if importlib.util.find_spec("datasets") is None:
        raise MdliteError(f"{source}: no local copy and the `datasets` package is not installed; "
                          f"pip install datasets, or {hint}")
    offline = not _hub_reachable()
    if offline:  # datasets' own cache only: an unreachable hub would cost ~25 s of retries
        os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    try:
        rows = datasets.load_dataset(hub_id, hub_config, split=splits[split])
    except Exception as error:  # the hub raises many kinds when offline
        failed = "cannot reach the Hugging Face hub" if offline else f"the hub failed ({type(error).__name__})"
        raise MdliteError(f"{source}: no local copy and {failed}; {hint}") from None
    log.info("loaded %s from the Hugging Face hub (%s)", source, hub_id)
    return [_problem_from_hub_row(name, split, i, row) for i, row in enumerate(rows)]


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub (`$HF_ENDPOINT`) answers within `timeout_s`; proxies from the environment apply."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", ""):
        return False
    request = urllib.request.Request(os.environ.get("HF_ENDPOINT") or "https://huggingface.co", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def _problem_from_hub_row(name: str, split: str, index: int, row: dict) -> Problem:
    """A hub row as a Problem; ids name the split (`gsm8k-test-0007`, as the local copies have them), except
    SVAMP's own ids (`chal-153`), which are unique across splits."""
    pid = f"{name}-{split}-{index:04d}"
    if name == "gsm8k":
        answer = row["answer"].split("####")[-1].replace(",", "")
        return Problem(pid, row["question"], float(answer))
    if name == "svamp":
        question = f"{row['Body'].strip()} {row['Question'].strip()}"
        return Problem(str(row.get("ID", pid)), question, float(row["Answer"]), row.get("Equation"))
    if name == "asdiv":
        answer = row["answer"].split(" (")[0]
        return Problem(pid, f"{row['body']} {row['question']}", float(answer))
    return Problem(pid, row["question"], float(row["final_ans"]))
