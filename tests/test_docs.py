"""The docs against the code: every command, figure, option, file and link they quote that the CPU can check."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import glob
import inspect
import io
import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import lightning_megatrain
import lightning_megatrain.chunking
import lightning_megatrain.losses
from lightning_megatrain import MegaTrainStrategy, plan_memory
from lightning_megatrain.engine.config import RuntimeConfig
from lightning_megatrain.plan import main as plan_main
from test_example import _load  # one loader of example and benchmark scripts by path, as test_example_lora does

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))
# MegaTrainStrategy's parameters that Lightning's connector fills in, not options a user sets
PLUMBING = {"accelerator", "checkpoint_io", "precision_plugin", "parallel_devices", "cluster_environment"}
TOP_DIRS = {"benchmarks", "docs", "examples", "tests", "lightning_megatrain", "engine", "checkpoint"}
METRIC_PREFIXES = ("perf/", "mem/", "tok/")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


# ----------------------------------------------------------------------------- the plan command
_GAP = r"(?:\s|\\\n)+"  # wrapped lines, shell continuations
PLAN_CMD = re.compile(r"python -m lightning_megatrain\.plan((?:" + _GAP + r"--[a-z][\w-]*(?:" + _GAP + r"[\w./][\w.\-/]*)?)+)")


def _plan_commands(text: str) -> list[tuple[int, tuple[str, ...]]]:
    """(offset, argv) of every runnable ``python -m lightning_megatrain.plan`` command, in inline code
    or code blocks; commands with placeholders (``N``, ``...``) are left out."""
    out = []
    for m in PLAN_CMD.finditer(text):
        argv = tuple(m.group(1).replace("\\\n", " ").split())
        if not any(re.fullmatch(r"[A-Z_]+", a) for a in argv):
            out.append((m.start(), argv))
    return out


@functools.lru_cache(maxsize=None)
def _plan_output(argv: tuple[str, ...]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        plan_main(list(argv))
    return buf.getvalue().rstrip("\n")


def _quoted_plans() -> list[tuple[str, tuple[str, ...], str]]:
    """(doc, argv, block) for every code block that shows the plan command's output: the block is
    the output of the last plan command before it in the same file."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        commands = _plan_commands(text)
        for m in FENCE.finditer(text):
            block = m.group(1).rstrip("\n")
            if not block.startswith("model: "):
                continue
            before = [argv for offset, argv in commands if offset < m.start()]
            assert before, f"{_rel(doc)}: a plan table without the command that prints it"
            found.append((_rel(doc), before[-1], block))
    return found


def test_every_quoted_plan_table_is_what_the_command_prints_now() -> None:
    quoted = _quoted_plans()
    assert {doc for doc, _, _ in quoted} >= {"docs/host-memory.md", "docs/distributed.md"}, quoted
    for doc, argv, block in quoted:
        printed = _plan_output(argv)
        assert block == printed, (
            f"{doc}: the table after `python -m lightning_megatrain.plan {' '.join(argv)}` is not what it prints:\n"
            f"--- quoted\n{block}\n--- printed\n{printed}"
        )


def test_every_plan_command_in_the_docs_runs() -> None:
    commands = {argv for doc in DOCS for _, argv in _plan_commands(doc.read_text())}
    assert len(commands) >= 3, commands  # README, host-memory, distributed, options
    for argv in sorted(commands):
        assert _plan_output(argv).startswith("model: "), argv


def test_big_models_summary_is_the_plans() -> None:
    """docs/big-models.md's summary table (host GiB, fits 1 / 1.5 TiB, GPU GiB at 16k tokens) and its
    80 GB figure for the 120B are the plan's."""
    from lightning_megatrain.memory import GiB
    from lightning_megatrain.plan import plan_for

    text = (REPO / "docs" / "big-models.md").read_text()
    presets = {"Llama-3-70B": "llama-70b", "120B": "llama-120b"}
    rows = re.findall(r'^\| (Llama-3-70B|120B) \| `"(\w+)"`[^|]* \| ([\d.]+) \| (yes|no) \| (yes|no) \| ([\d.]+) \|$', text, re.M)
    assert len(rows) == 5, rows
    for name, mode, host, one, one_half, gpu in rows:
        plan = plan_for(presets[name], mode, 1536 * GiB, 141 * GiB, 16384)
        assert (host, gpu) == (f"{plan.host_total / GiB:.1f}", f"{plan.device_total / GiB:.1f}"), (name, mode)
        assert (one, one_half) == tuple("yes" if plan.host_total <= h * GiB else "no" for h in (1024, 1536)), (name, mode)
    small = plan_for("llama-120b", "lean", 1536 * GiB, 80 * GiB, 4096)
    assert small.fits() and f"({small.device_total / GiB:.1f} GiB of GPU memory" in re.sub(r"\s+", " ", text)


# ----------------------------------------------------------------------------- example configs
@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_example_config_is_accepted_by_its_script(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--print_config`` parses the whole file against the script's classes and MegaTrainStrategy's
    signature (jsonargparse refuses an unknown or ill-typed option) without building anything."""
    script = REPO / "examples" / ("finetune_lora.py" if config.name.startswith("lora_") else "pretrain_llama.py")
    header = "".join(line for line in config.read_text().splitlines(True) if line.startswith("#"))
    for named in re.findall(r"examples/[\w/.-]+\.(?:py|yaml)", header):
        assert (REPO / named).is_file(), f"{config.name} names {named}, which does not exist"
    extra = [f"--model.pretrained_path={tmp_path}"] if script.name == "finetune_lora.py" else []
    monkeypatch.setattr(sys, "argv", [str(script)])
    module = _load(f"docs_{script.stem}", script)
    with pytest.raises(SystemExit) as exit_info:
        module.main([f"--config={config}", *extra, "--print_config"], run=False)
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "trainer:" in printed and "model:" in printed


# ----------------------------------------------------------------------------- LoRA plans
@functools.lru_cache(maxsize=None)
def _lora_plan(shape: str, **kwargs: Any) -> tuple[float, float]:
    """(host GiB, device GiB) of ``benchmarks/lora_plan.py``'s plan: LoRA r=16 on a bf16 Llama-3 shape."""
    pytest.importorskip("peft")
    module = _load("docs_lora_plan", REPO / "benchmarks" / "lora_plan.py")
    plan = module.plan(shape, **kwargs)
    return plan.host_total / 1024**3, plan.device_total / 1024**3


def test_lora_plan_figures_in_the_docs_and_configs() -> None:
    """docs/lora.md's table (prefetch 1, 8192 tokens: the script's defaults) and the 8B/70B configs'
    comments (from ``--prefetch 2 --batch-tokens 16384 --host-memory auto``, as they say)."""
    text = (REPO / "docs" / "lora.md").read_text()
    for shape in ("8B", "70B"):
        row = re.search(rf"^\| Llama-3 {shape} shape \| ([\d.]+) GiB \| ([\d.]+) GiB \|", text, re.M)
        assert row, f"docs/lora.md has no row for {shape}"
        host, device = _lora_plan(shape)
        assert (row.group(1), row.group(2)) == (f"{host:.1f}", f"{device:.1f}"), (shape, host, device)
        config = (REPO / "examples" / "configs" / f"lora_llama3_{shape.lower()}.yaml").read_text()
        assert "lora_plan.py --prefetch 2 --batch-tokens 16384 --host-memory auto" in config
        host, device = _lora_plan(shape, prefetch=2, batch_tokens=16384, host_memory="auto")
        stated_host = re.search(r"^# Host RAM: ([\d.]+) GiB", config, re.M)
        stated_device = re.search(r"^# GPU: ([\d.]+) GiB in the plan", config, re.M)
        assert stated_host and stated_device, shape
        assert (stated_host.group(1), stated_device.group(1)) == (f"{host:.1f}", f"{device:.1f}"), (shape, host, device)
        assert f"host plan {host:.1f} GiB" in re.sub(r"\s+", " ", text), f"docs/lora.md: the {shape} config's host plan"


# ----------------------------------------------------------------------------- options
def _strategy_params() -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(MegaTrainStrategy.__init__).parameters)
    params.pop("self")
    return {k: v for k, v in params.items() if k not in PLUMBING}


def _option_tables(doc: Path) -> list[tuple[list[str], str]]:
    """(names, default cell) of every row of the doc's tables whose header starts with ``| argument |``."""
    rows: list[tuple[list[str], str]] = []
    for table in re.findall(r"^\| argument \|.*?\n\|[-| ]+\|\n((?:\|.*\n?)+)", doc.read_text(), re.M):
        header = re.search(r"^(\| argument \|[^\n]*)\n\|[-| ]+\|\n" + re.escape(table), doc.read_text(), re.M)
        assert header is not None
        columns = [c.strip() for c in header.group(1).strip("|").split("|")]
        at = columns.index("default")
        for line in table.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.append((re.findall(r"`(\w+)`", cells[0]), cells[at]))
    return rows


def _default_of(cell: str) -> Any:
    """The value a default cell states, or ``...`` when it is prose only."""
    cell = cell.strip()
    m = re.fullmatch(r"`([^`]+)`(?: = .*)?", cell)
    if m:
        try:
            return ast.literal_eval(m.group(1))
        except (SyntaxError, ValueError):
            cell = m.group(1)
    m = re.fullmatch(r"(\d+) GiB", cell)
    if m:
        return int(m.group(1)) * 1024**3
    m = re.fullmatch(r"(\d+) min(?:utes)?", cell)
    if m:
        return timedelta(minutes=int(m.group(1)))
    return ...


@pytest.mark.parametrize("doc", ["README.md", "docs/options.md", "docs/distributed.md"])
def test_documented_options_are_the_strategys_with_its_defaults(doc: str) -> None:
    params = _strategy_params()
    rows = _option_tables(REPO / doc)
    assert rows, f"{doc} has no option table"
    checked = 0
    for names, default_cell in rows:
        cells = [c.strip() for c in default_cell.split(", ")] if len(names) > 1 else [default_cell]
        assert len(cells) in (1, len(names)), (doc, names, default_cell)
        for name, cell in zip(names, cells * len(names) if len(cells) == 1 else cells):
            assert name in params, f"{doc} documents `{name}`, which MegaTrainStrategy does not take"
            stated = _default_of(cell)
            if stated is not ...:
                assert stated == params[name].default, f"{doc}: `{name}` defaults to {params[name].default!r}, not {cell}"
                checked += 1
    assert checked >= len(rows) // 2, f"{doc}: most defaults could not be read ({checked} of {len(rows)})"
    if doc == "docs/options.md":
        documented = {n for names, _ in rows for n in names}
        assert set(params) <= documented, f"options.md lacks {sorted(set(params) - documented)}"


def test_engine_defaults_and_plan_memory_agree_with_the_strategy() -> None:
    params = _strategy_params()
    for f in dataclasses.fields(RuntimeConfig):
        # RuntimeConfig.host_memory is the resolved mode ("auto" is resolved by the strategy before it)
        if f.name in params and f.name != "host_memory":
            assert f.default == params[f.name].default, f"RuntimeConfig.{f.name}={f.default!r}, strategy {params[f.name].default!r}"
    plan = inspect.signature(plan_memory).parameters
    assert plan["host_memory"].default == params["host_memory"].default
    assert plan["prefetch"].default == params["prefetch"].default
    assert plan["batch_tokens"].default == params["plan_batch_tokens"].default


def test_documented_function_signatures_are_complete_and_current() -> None:
    """``name(arg=default, ...)`` in options.md lists every parameter, with the code's defaults."""
    text = (REPO / "docs" / "options.md").read_text()
    functions = {
        "lightning_megatrain.plan_memory": lightning_megatrain.plan_memory,
        "MegaTrainMonitor": lightning_megatrain.MegaTrainMonitor.__init__,
        "lightning_megatrain.losses.chunked_linear_cross_entropy": lightning_megatrain.losses.chunked_linear_cross_entropy,
        "lightning_megatrain.chunking.chunk_tokenwise": lightning_megatrain.chunking.chunk_tokenwise,
    }
    for name, fn in functions.items():
        m = re.search(re.escape(name) + r"\((.*?)\)`", text)
        assert m, f"options.md does not show {name}(...)"
        call = ast.parse(f"f({m.group(1).replace('*, ', '')})").body[0].value  # type: ignore[attr-defined]
        shown = [a.id for a in call.args] + [k.arg for k in call.keywords]
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert shown == params, f"options.md shows {name}({', '.join(shown)}); the code has ({', '.join(params)})"
        for k in call.keywords:
            want = inspect.signature(fn).parameters[k.arg].default
            assert ast.literal_eval(k.value) == want, f"{name}: {k.arg} defaults to {want!r}"


# ----------------------------------------------------------------------------- files and links
def _linked(doc: Path) -> list[str]:
    text = doc.read_text()
    out = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://|#", t)]
    for span in re.findall(r"`([^`\n]+)`", _prose(text)):
        for word in span.split():
            word = word.rstrip(":,;)")
            if re.search(r"[=<{|$:]|^/|^\.\.\.|^--|^\d", word) or word.startswith(METRIC_PREFIXES):
                continue
            if "/" in word and (re.search(r"\.(?:md|py|ya?ml|json|sh|txt|png|gz)$", word) or word.split("/")[0] in TOP_DIRS):
                out.append(word)
            elif "/" not in word and re.search(r"\.(?:md|py)$", word):
                out.append("**/" + word)  # a module or doc named without its folder
    return out


@pytest.mark.parametrize("doc", DOCS, ids=[_rel(d) for d in DOCS])
def test_files_and_links_the_docs_name_exist(doc: Path) -> None:
    missing = []
    for target in _linked(doc):
        path = target.split("#")[0]
        bases = [doc.parent, REPO, REPO / "lightning_megatrain"]
        if path and not any(glob.glob(str(base / path), recursive=path.startswith("**/")) for base in bases):
            missing.append(target)
    assert not missing, f"{_rel(doc)} names files that are not in the repository: {missing}"


def test_every_metric_the_docs_name_is_logged_by_the_monitor() -> None:
    source = (REPO / "lightning_megatrain" / "callbacks.py").read_text()
    logged = set(re.findall(r'"((?:perf|mem)/\w+|tok/s)"', source))
    named = {m for doc in DOCS for m in re.findall(r"`((?:perf|mem)/\w+|tok/s)`", doc.read_text())}
    assert len(named) >= 10 and named <= logged, f"named in the docs, not logged: {sorted(named - logged)}"


@functools.lru_cache(maxsize=None)
def _project_classes() -> dict[str, set[str]]:
    """Every class of the package and the names it defines (methods, class attributes, ``self.x = ...``)."""
    classes: dict[str, set[str]] = {}
    for path in (REPO / "lightning_megatrain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names = classes.setdefault(node.name, set())
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(sub.name)
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store):
                        names.add(sub.attr)
                    elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        names.add(sub.id)
                    elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                        names.add(sub.target.id)
    return classes


def test_classes_methods_and_tests_the_docs_name_exist() -> None:
    """``Class.method`` of the package's own classes and ``test_file.py::test_name`` references."""
    classes = _project_classes()
    tests = {p.name: p.read_text() for p in (REPO / "tests").glob("test_*.py")}
    missing, checked = [], 0
    for doc in DOCS:
        text = doc.read_text()
        for cls, attr in re.findall(r"`([A-Z]\w+)\.(\w+)(?:\(\))?`", text):
            if cls in classes:
                checked += 1
                if attr not in classes[cls]:
                    missing.append(f"{_rel(doc)}: {cls}.{attr}")
        for file, name in re.findall(r"`(?:tests/)?(test_\w+\.py)::(\w+)", text):
            checked += 1
            if not re.search(rf"^def {name}\(", tests.get(file, ""), re.M):
                missing.append(f"{_rel(doc)}: {file}::{name}")
    assert checked >= 10, checked
    assert not missing, f"named in the docs, not in the code: {missing}"


# ----------------------------------------------------------------------------- statements the code contradicts
def test_statements_that_contradict_the_code() -> None:
    """Sentences seen drifting from the code (issue 26); each names what the code does instead."""
    results = (REPO / "benchmarks" / "RESULTS.md").read_text()
    gpu_figures = "GPU round" in results and "tokens/s" in results
    problems = []
    for doc in DOCS:
        text = re.sub(r"\s+", " ", doc.read_text())
        for m in re.finditer(r"gradient[^.]{0,60}prefetch \+ 1|prefetch \+ 1`? (?:of them|layers)[^.]{0,40}gradient", text):
            if "grad_channels" not in m.group(0):
                problems.append(f"{_rel(doc)}: gradient buffers are `grad_channels`, not prefetch + 1: {m.group(0)!r}")
        if gpu_figures:
            for m in re.finditer(r"[Nn]o GPU figures (?:yet|exist)|not yet run on a GPU", text):
                problems.append(f"{_rel(doc)}: benchmarks/RESULTS.md has GPU figures: {m.group(0)!r}")
        for m in re.finditer(r"\| multi-GPU \| no\b", text):
            problems.append(f"{_rel(doc)}: devices=N trains data parallel: {m.group(0)!r}")
        for m in re.finditer(r"errors? [^.]{0,40}for more than one device", text):
            problems.append(f"{_rel(doc)}: more than one device is not refused: {m.group(0)!r}")
    assert not problems, "\n".join(problems)


def test_the_quoted_setup_plan_gives_the_reason_the_code_gives() -> None:
    """docs/host-memory.md's excerpt of the plan printed at setup: "auto" on the CPU, as the strategy resolves it."""
    from lightning_megatrain.memory import choose_host_memory

    mode, why = choose_host_memory("auto", "cpu", __import__("torch").bfloat16)
    text = (REPO / "docs" / "host-memory.md").read_text()
    assert f"  host_memory='{mode}': {why}\n" in text
