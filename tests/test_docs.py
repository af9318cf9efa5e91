"""The documentation stays true to the code: its commands compose, its config keys exist, its numbers say where
they come from.

(a) Every ``python train.py ...`` / ``python evaluate.py ...`` / ``python closed_loop.py ...`` command in
``docs/**/*.md``, ``README.md`` and ``slurm/README.md`` (code blocks and inline code) composes with Hydra's compose API against ``conf/``
(placeholders such as ``<model.ckpt>`` become a dummy path; a sweep ``a=x,y`` composes its first value; ``-m`` is
dropped). (b) Every config key the pages name (``a.b.c=`` in commands and inline code, and inline ``a.b.c`` whose
first part is a top-level config key) exists in a composed config, unless written ``+a.b.c=`` (added). (c) Every
``docs/numbers/*.json`` holds command, date, machine and values, and the docs hook renders, refuses and marks as
not measured as it says.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from neuroguide.config import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md", REPO / "slurm" / "README.md"]
ENTRY_POINTS = {"train.py": "train", "evaluate.py": "evaluate", "closed_loop.py": "closed_loop"}
DUMMY = "/tmp/neuroguide-docs-placeholder"
FILE_NAME = re.compile(r"\.(h5|hdf5|py|yaml|json|csv|png|ckpt|pt|pth|txt|md|npy|gz|log|sbatch|sh)$")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
VAR = re.compile(r"^([A-Z][A-Z0-9_]*)=\"(.*)\"$", re.S)


# ---------------------------------------------------------------------------------------------------- parsing
def _logical_lines(block: str) -> list[str]:
    """Lines of a shell block with backslash continuations joined."""
    out, cur = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
        else:
            out.append(cur + line)
            cur = ""
    if cur:
        out.append(cur)
    return out


def _shell_words(line: str, variables: dict[str, str]) -> list[str]:
    """``line``'s words without comments, ``$VAR`` expanded from the block's ``VAR="..."`` assignments."""
    for name, value in variables.items():
        line = line.replace(f"${name}", value)
    return shlex.split(re.sub(r"<[^<>\n]*>", DUMMY, line), comments=True)


def commands_in(text: str) -> list[list[str]]:
    """Every ``python <entry point> ...`` command in ``text`` (code blocks and inline code) as its words after the
    entry point's name, e.g. ``["region=TO", "alpha=0.5"]`` for train.py, tagged by its first word (the script)."""
    found = []
    for block in FENCE.findall(text):
        variables: dict[str, str] = {}
        for line in _logical_lines(block):
            m = VAR.match(line.strip())
            if m:
                variables[m.group(1)] = m.group(2)
                continue
            words = _shell_words(line, variables) if "python" in line else []
            for i, w in enumerate(words[:-1]):
                if w == "python" and words[i + 1] in ENTRY_POINTS:
                    found.append(words[i + 1:])
    prose = FENCE.sub("", text)
    for span in INLINE.findall(prose):
        words = shlex.split(re.sub(r"<[^<>]*>", DUMMY, span)) if span.startswith("python ") else []
        if len(words) > 1 and words[1] in ENTRY_POINTS:
            found.append(words[1:])
    return found


def _top_level_comma(value: str) -> bool:
    depth = 0
    for ch in value:
        depth += ch in "[{(" and 1 or (-1 if ch in "]})" else 0)
        if ch == "," and depth == 0:
            return True
    return False


def overrides_of(words: list[str]) -> list[str]:
    """The Hydra overrides of a command's words (after the script): placeholders replaced, ``-m`` and ``...`` dropped,
    a sweep reduced to its first value."""
    out = []
    for w in words:
        if w in ("-m", "--multirun", "...", "--cfg", "job") or "=" not in w:
            continue
        w = re.sub(r"<[^<>]*>", DUMMY, w).replace("[...]", f"[{DUMMY}]").replace("=...", f"={DUMMY}")
        key, value = w.split("=", 1)
        if _top_level_comma(value) and not value.startswith(("[", "{")):
            value = value.split(",", 1)[0]
        out.append(f"{key}={value}")
    return out


def all_commands() -> list[tuple[str, str, list[str]]]:
    """(page, script, overrides) of every command in the docs and the README."""
    out = []
    for page in PAGES:
        for words in commands_in(page.read_text()):
            out.append((str(page.relative_to(REPO)), words[0], overrides_of(words[1:])))
    return out


# ---------------------------------------------------------------------------------------------------- composing
@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def try_compose(config_name: str, overrides: list[str]):
    """The composed config, or the error message."""
    try:
        return compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError, KeyError) as e:
        return " ".join(str(e).split())[:400]


def test_the_docs_show_commands_of_every_entry_point():
    scripts = {s for _, s, _ in all_commands()}
    assert scripts == set(ENTRY_POINTS), f"commands found for {scripts}"
    assert len(all_commands()) > 60


def test_every_command_in_the_docs_composes(hydra_conf):
    failed, seen = [], {}
    for page, script, ov in all_commands():
        key = (script, tuple(ov))
        if key not in seen:  # the README repeats commands of the pages: compose each once
            seen[key] = try_compose(ENTRY_POINTS[script], ov)
        if isinstance(seen[key], str):
            failed.append(f"{page}: python {script} {' '.join(ov)}\n    {seen[key]}")
    assert not failed, "commands that do not compose:\n" + "\n".join(failed)


def test_every_plus_key_of_the_docs_is_one_its_entry_point_lets_through(hydra_conf):
    """train.py, evaluate.py and closed_loop.py refuse a '+key' that nothing reads (neuroguide.command_line): the
    docs' own '+' keys are read."""
    from neuroguide.command_line import check_added_keys

    refused, n = [], 0
    for page, script, ov in all_commands():
        if not any(o.startswith("+") for o in ov):
            continue
        cfg = try_compose(ENTRY_POINTS[script], ov)
        if isinstance(cfg, str):  # does not compose: test_every_command_in_the_docs_composes names it
            continue
        try:
            check_added_keys(ov, cfg, ENTRY_POINTS[script])
            n += 1
        except ValueError as e:
            refused.append(f"{page}: python {script} {' '.join(ov)}\n    {e}")
    assert not refused, "\n".join(refused)
    assert n >= 4  # +paths.robust_weights.N, +backbone.source, ...


def test_the_checker_catches_a_key_that_needs_a_plus(hydra_conf):
    """Planted: the README's former commands, which set keys that the configs lack without ``+``."""
    text = ("```bash\npython train.py task=encoding region=EBA backbone=resnet50_l2_eps3 "
            "'paths.robust_weights={3: /w/x.ckpt}'\npython train.py task=encoding backbone.source=timm\n```\n"
            "and `python train.py task.datamodule.unreadable=error` in prose")
    cmds = commands_in(text)
    assert len(cmds) == 3
    for words in cmds:
        assert isinstance(try_compose("train", overrides_of(words[1:])), str), words
    for words in cmds:  # the same with "+" compose
        fixed = [("+" + w if w.split("=")[0] in ("paths.robust_weights", "backbone.source",
                                                 "task.datamodule.unreadable") else w) for w in words[1:]]
        assert not isinstance(try_compose("train", overrides_of(fixed)), str), fixed


def test_overrides_of_placeholders_sweeps_and_variables():
    text = ('```bash\nL="out_dir=/lab loop.sites=[a01,a02]"\npython closed_loop.py step=report $L  # comment\n'
            "python train.py -m region=V1,V2,TO alpha=0.5 at.eps=0,1 \\\n    seed=0\n"
            "python evaluate.py eval=[transfer] models=[<a.ckpt>,<b.ckpt>] eval.transfer.effect.target=[0.5,1.0]\n```")
    (cl, tr, ev) = commands_in(text)
    assert overrides_of(cl[1:]) == ["step=report", "out_dir=/lab", "loop.sites=[a01,a02]"]
    assert overrides_of(tr[1:]) == ["region=V1", "alpha=0.5", "at.eps=0", "seed=0"]
    assert overrides_of(ev[1:]) == ["eval=[transfer]", f"models=[{DUMMY},{DUMMY}]",
                                    "eval.transfer.effect.target=[0.5,1.0]"]


# ---------------------------------------------------------------------------------------------------- config keys
def _keys(cfg, prefix="") -> set[str]:
    out = set()
    c = OmegaConf.to_container(cfg, resolve=False) if not isinstance(cfg, dict) else cfg
    for k, v in c.items():
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, dict):
            out |= _keys(v, key + ".")
    return out


@pytest.fixture(scope="module")
def known_keys(hydra_conf):
    """Every key of the composed configs: train with each task (and backbone-using tasks), evaluate with every
    analysis, the closed loop."""
    from neuroguide.evaluation.registry import registered

    keys: set[str] = set()
    for ov in ([], ["task=predictor"], ["task=it_encoding"], ["task=encoding"], ["task=encoding", "backbone=vgg16"],
               ["region=random"], ["data=nsd"], ["data=cifar100"], ["data=imagenet_subset"]):
        keys |= _keys(compose(config_name="train", overrides=ov))
    evals = sorted({p.stem for p in (CONF_DIR / "eval").glob("*.yaml")} | set(registered()))
    evals = [e for e in evals if (CONF_DIR / "eval" / f"{e}.yaml").exists()]
    keys |= _keys(compose(config_name="evaluate", overrides=[f"eval=[{','.join(evals)}]"]))
    keys |= _keys(compose(config_name="closed_loop"))
    return keys


def named_keys(text: str) -> set[str]:
    """Config keys a page names: ``a.b=`` in commands and inline code (not ``+a.b=``), and inline ``a.b.c``."""
    names = set()
    spans = INLINE.findall(FENCE.sub("", text))
    words = [w for block in FENCE.findall(text) for line in _logical_lines(block) if "python" in line
             for w in _shell_words(line, {})]
    for s in spans:
        words += s.split() if "=" in s else [s]
    for w in words:
        w = w.strip("'\",;:()")
        key = w.split("=", 1)[0] if "=" in w else (w if re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_]+)+", w) else None)
        if key and re.fullmatch(r"[a-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_\-]+)+", key) and not FILE_NAME.search(key):
            names.add(key)
    return names


def test_no_page_names_a_config_key_the_configs_lack(known_keys):
    tops = {k.split(".")[0] for k in known_keys} - {"hydra"}
    missing = []
    for page in PAGES:
        for key in sorted(named_keys(page.read_text())):
            if key.split(".")[0] in tops and key not in known_keys:
                missing.append(f"{page.relative_to(REPO)}: {key}")
    assert not missing, "keys the configs lack (write +key= for keys a command adds):\n" + "\n".join(missing)


def test_named_keys_of_a_planted_page():
    text = ("Set `task.monitor=val/adv_acc` or `eval.control.nonsense`; `+paths.robust_weights.2=/w` adds one;\n"
            "```bash\npython train.py data.synthetic_nsd.planted=depth\n```\n`neuroguide.load_model` is code.")
    assert named_keys(text) >= {"task.monitor", "eval.control.nonsense", "data.synthetic_nsd.planted"}
    assert "paths.robust_weights.2" not in named_keys(text) and "+paths.robust_weights.2" not in named_keys(text)
    assert not named_keys("write `day_000/stimuli.h5` and edit `evaluation/stimuli.py`")  # file names, not keys


# ---------------------------------------------------------------------------------------------------- numbers
def _hook():
    spec = importlib.util.spec_from_file_location("docs_numbers_hook", REPO / "docs" / "hooks" / "numbers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_numbers_file_says_how_it_was_made():
    files = sorted((REPO / "docs" / "numbers").glob("*.json"))
    assert files, "docs/numbers/ holds no numbers file"
    for path in files:
        data = json.loads(path.read_text())
        for key in ("command", "date", "machine"):
            assert isinstance(data.get(key), str) and data[key].strip(), f"{path.name}: no {key}"
        assert isinstance(data.get("values"), dict) and data["values"], f"{path.name}: no values"
        script = next(w for w in shlex.split(data["command"])[1:] if w.endswith(".py"))
        assert (REPO / script).is_file(), f"{path.name}: its command names {script}, which is not in the repo"


def test_the_hook_renders_refuses_and_marks_the_unmeasured(tmp_path):
    hook = _hook()
    (tmp_path / "m.json").write_text(json.dumps({
        "command": "python benchmarks/numbers/main_command.py", "date": "2025-01-01", "machine": "m",
        "values": {"acc": {"mean": 0.9312, "sd": 0.0141, "min": 0.915, "max": 0.94, "n": 3, "runs": [0.915, 0.94, 0.94]},
                   "t": {"columns": ["a", "b"], "rows": [["x", 1.5]]}, "k": 7}}))
    numbers = hook.load_numbers(tmp_path)
    out = hook.render("acc {{ numbers.m.acc }} ({{ numbers.m.acc.range }}, n={{ numbers.m.acc.n }}) k={{numbers.m.k}}",
                      numbers, "p.md")
    assert out == "acc 0.9312 ± 0.0141 (0.915–0.94, n=3) k=7"
    assert hook.render("{{ table.m.t }}", numbers, "p.md") == "| a | b |\n| --- | --- |\n| x | 1.5 |"
    assert "python benchmarks/numbers/main_command.py" in hook.render("{{ provenance.m }}", numbers, "p.md")
    block = "{{ numbers_or_todo.%s }}v={{ numbers.%s.k }}{{ end_numbers_or_todo }}"
    assert hook.render(block % ("m", "m"), numbers, "p.md") == "v=7"
    with pytest.raises(hook.PluginError, match="names no script"):  # the default script does not exist
        hook.render(block % ("absent", "absent"), numbers, "p.md")
    todo = hook.render("{{ numbers_or_todo.absent | python benchmarks/rsa.py --x }}BODY {{ numbers.absent.k }}"
                       "{{ end_numbers_or_todo }}", numbers, "p.md")
    assert "Not measured on this version yet" in todo and "Run `python benchmarks/rsa.py --x`" in todo
    assert "BODY" not in todo
    for bad, msg in [("{{ numbers.m.nope }}", "no key 'nope'"), ("{{ numbers.absent.k }}", "no docs/numbers/absent"),
                     ("{{ numbers.m.t }}", "not a summary"), ("{{ whatever }}", "unknown placeholder"),
                     ("{{ table.m.k }}", "a table is")]:
        with pytest.raises(hook.PluginError, match=msg):
            hook.render(bad, numbers, "p.md")
    (tmp_path / "bad.json").write_text(json.dumps({"command": "x", "values": {}}))
    with pytest.raises(hook.PluginError, match=r"missing \['date', 'machine'\]"):
        hook.load_numbers(tmp_path)


def test_no_typed_number_is_left_beside_a_measured_one():
    """Every page that renders numbers of a file names that file's provenance (the command, date and machine)."""
    for page in PAGES:
        text = page.read_text()
        used = set(re.findall(r"\{\{\s*(?:numbers|table)\.([A-Za-z0-9_]+)\.", text))
        for file in used:
            assert re.search(r"\{\{\s*provenance\.%s\s*\}\}" % file, text), f"{page.name}: {file} without provenance"
