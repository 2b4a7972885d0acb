"""Fuzz the patch transforms over reformatted fixtures (see variants.py for the mutations).

Each variant must end as a correct patch -- every output parses and compiles, MedicoSAM is present
and wired (checked per tool by evaluating the patched tables and running the patched functions
against stubs), nothing else in the tables changed, and re-running the transforms on the result
changes nothing -- or as a clean refusal (LayoutError/PatchError) with the tree untouched.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys
import time
import types
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import segment_anything
import variants
from helpers import snapshot

from medico_adapters import patching
from medico_adapters.adapters import napari_sam, samm, slicer_sws
from medico_adapters.adapters.base import run_codemod
from medico_adapters.engine import Tree
from medico_adapters.errors import PatchError

ADAPTERS = {
    "N1": napari_sam.ADAPTER, "N2": napari_sam.ADAPTER, "N3": napari_sam.ADAPTER,
    "S2": samm.ADAPTER, "S3": samm.ADAPTER, "S4": samm.ADAPTER, "samm-server": samm.ADAPTER,
    "W1": slicer_sws.ADAPTER, "W2": slicer_sws.ADAPTER,
}
#: variants per layout: a quick default (the transforms take 0.3-2 s per variant), or
#: MEDICO_FUZZ_VARIANTS=<n> for a long run; MEDICO_FUZZ_IDEMPOTENCE=<k> re-patches every k-th result.
FULL = int(os.environ.get("MEDICO_FUZZ_VARIANTS", "0"))
COUNTS = {"N1": 24, "N2": 24, "N3": 24, "S2": 20, "S3": 20, "S4": 20, "samm-server": 24, "W1": 24, "W2": 24}
IDEMPOTENCE_EVERY = int(os.environ.get("MEDICO_FUZZ_IDEMPOTENCE", "3"))

RESULTS: dict[str, Counter] = defaultdict(Counter)
MUTATION_RESULTS: dict[str, Counter] = defaultdict(Counter)
REFUSALS: dict[str, list[str]] = defaultdict(list)
IDEMPOTENCE: Counter = Counter()
TIMES: dict[str, float] = {}


# --- helpers ----------------------------------------------------------------------------------


def run(data: bytes, path: str) -> dict:
    """Execute a module's source as a throw-away module (registered while it runs, for dataclasses)."""
    module = types.ModuleType("fuzz_" + Path(path).stem)
    module.__file__ = path
    sys.modules[module.__name__] = module
    try:
        exec(compile(data, path, "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module.__dict__


def tree_ast(data: bytes) -> ast.Module:
    return ast.parse(data.decode("utf-8-sig"))


def assignment(module: ast.Module, name: str) -> ast.expr:
    found = [n.value for n in module.body if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)]
    assert len(found) == 1, f"{len(found)} module-level assignments to {name}"
    return found[0]


def literal(data: bytes, name: str):
    return ast.literal_eval(assignment(tree_ast(data), name))


def any_literal(data: bytes, name: str):
    found = [n.value for n in ast.walk(tree_ast(data)) if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)]
    assert len(found) == 1, f"{len(found)} assignments to {name}"
    return ast.literal_eval(found[0])


def method(data: bytes, cls: str, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree_ast(data)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"no {cls}.{name}")


def function(data: bytes, cls: str, name: str, globals_: dict):
    """The method compiled on its own, against stub globals."""
    ns = dict(globals_)
    exec(compile(ast.unparse(method(data, cls, name)), f"<{cls}.{name}>", "exec"), ns)
    return ns[name]


def raises(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 -- the caller compares exception types
        return e
    return None


def check_bytes(before: bytes, after: bytes, rel: str) -> None:
    compile(after, rel, "exec")  # a BOM, CRLF and all, as Python will read it
    assert after.startswith(b"\xef\xbb\xbf") == before.startswith(b"\xef\xbb\xbf"), f"{rel}: BOM lost or added"
    if b"\r\n" in before and before.count(b"\n") == before.count(b"\r\n"):
        assert after.count(b"\n") == after.count(b"\r\n"), f"{rel}: CRLF file got bare LF lines"
    if b"\r\n" not in before:
        assert b"\r" not in after, f"{rel}: LF file got CR characters"


# --- per-tool checks: MedicoSAM present and wired, everything else as it was ------------------

URL = napari_sam.LOCAL_SCHEME + "vit_b_medicosam.pt"


def _napari_guard(fn, *args, placed: bool = False) -> None:
    if placed:  # the checkpoint is there: the widget loads it, no guard, no download
        assert Path(fn(*args)).name == "vit_b_medicosam.pt"
        return
    e = raises(fn, *args)
    assert isinstance(e, FileNotFoundError) and napari_sam.GUARD_HINT in str(e), f"get_weights_path('MedicoSAM') gave {e!r}"


def check_napari(layout: str, before: dict[str, bytes], after: dict[str, bytes], placed: bool = False) -> None:
    pkg = "src/napari_sam" if layout == "N3" else "napari_sam"
    widget, utils = f"{pkg}/_widget.py", f"{pkg}/utils.py"
    if layout == "N3":
        old, new = run(before[widget], widget)["SAM_MODELS"], run(after[widget], widget)
        models = new["SAM_MODELS"]
        assert list(models) == [*old, "MedicoSAM"], list(models)
        assert {k: v for k, v in models.items() if k != "MedicoSAM"} == old
        assert models["MedicoSAM"] == {"filename": "vit_b_medicosam.pt", "url": URL, "model": segment_anything.build_sam_vit_b}
        assert "MedicoSAM" in new["SamWidget"].model_names(None)
        stub = types.SimpleNamespace(download=lambda url, path: (_ for _ in ()).throw(RuntimeError("download")))
        _napari_guard(new["SamWidget"].get_weights_path, stub, "MedicoSAM", placed=placed)
        assert isinstance(raises(new["SamWidget"].get_weights_path, stub, "vit_b"), RuntimeError)
        return
    table_file = widget if layout == "N2" else utils
    old_urls = run(before[table_file], table_file)["SAM_WEIGHTS_URL"]
    urls_ns = run(after[table_file], table_file)
    urls = urls_ns["SAM_WEIGHTS_URL"]
    assert list(urls) == [*old_urls, "MedicoSAM"] and urls["MedicoSAM"] == URL
    assert {k: v for k, v in urls.items() if k != "MedicoSAM"} == old_urls
    if layout == "N1":
        _napari_guard(urls_ns["get_weights_path"], "MedicoSAM")
        fake = types.ModuleType("napari_sam.utils")
        fake.__dict__.update(urls_ns)
        saved = {k: sys.modules.get(k) for k in ("napari_sam", "napari_sam.utils")}
        sys.modules["napari_sam"], sys.modules["napari_sam.utils"] = types.ModuleType("napari_sam"), fake
        try:
            ns = run(after[widget], widget)
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    else:
        ns = run(after[widget], widget)
        _napari_guard(ns["SamWidget"].get_weights_path, None, "MedicoSAM")
    registry = ns["sam_model_registry"]
    assert registry["MedicoSAM"] is segment_anything.sam_model_registry["vit_b"]
    assert {k: v for k, v in registry.items() if k != "MedicoSAM"} == dict(segment_anything.sam_model_registry)
    assert ns["SamWidget"].model_names(None)[-1] == "MedicoSAM"


def check_samm_legacy(layout: str, before: dict[str, bytes], after: dict[str, bytes]) -> None:
    mappers = [literal(after[rel], "SammModelMapper") for rel in (samm.SERVER_MSG, samm.SLICER_MSG)]
    assert mappers[0] == mappers[1] and list(mappers[0]) == list(mappers[1]), "the two SammModelMapper copies differ"
    old = literal(before[samm.SERVER_MSG], "SammModelMapper")
    new = mappers[0]
    number = max(v for k, v in old.items() if k != "DICT") + 1
    assert new["medicosam_vit_b"] == number
    assert new["DICT"] == [*old["DICT"], "medicosam_vit_b"]
    assert {k: v for k, v in new.items() if k not in ("medicosam_vit_b", "DICT")} == {k: v for k, v in old.items() if k != "DICT"}
    assert all(new["DICT"][v] == k for k, v in new.items() if k != "DICT"), "ints and DICT out of step"
    assert any_literal(after[samm.WIDGET], "comboModelItems") == [*any_literal(before[samm.WIDGET], "comboModelItems"), "medicosam_vit_b"]

    server = after[samm.SERVER_UTIL]
    assert literal(server, samm.MODELS_TABLE) == {"medicosam_vit_b": ("vit_b", "vit_b_medicosam.pt")}
    init = method(server, "SammParameterNode", "initNetwork")
    assert ast.literal_eval(init.args.defaults[0]) == "medicosam_vit_b", "default model not MedicoSAM"
    ifs = [s for s in init.body if isinstance(s, ast.If)]
    exact = [i for i, s in enumerate(ifs) if ast.unparse(s.test) == f"model in {samm.MODELS_TABLE}"]
    prefix = [i for i, s in enumerate(ifs) if ast.unparse(s.test).startswith("model.startswith(")]
    assert len(exact) == 1 and prefix and exact[0] < prefix[0], "exact-name dispatch missing or after the prefix dispatch"
    assert [ast.unparse(s) for s in ifs[exact[0]].body] == [f"self.{samm.LOADER}(model)", "return"]
    cuda = next(s for s in ifs if ast.unparse(s.test) == "torch.cuda.is_available()")
    assert cuda.orelse, "no CPU fallback"
    # the loader itself, run against stubs: it builds vit_b from the placed file, on the fallback device
    calls = []
    names = samm._segment_anything_names(__import__("libcst").parse_module(server))
    loader_globals = {
        "os": __import__("os"),
        samm.MODELS_TABLE: literal(server, samm.MODELS_TABLE),
        names[0]: {"vit_b": lambda checkpoint: calls.append(checkpoint) or types.SimpleNamespace(to=lambda device: None)},
        names[1]: lambda sam: ("predictor", sam),
    }
    loader = function(server, "SammParameterNode", samm.LOADER, loader_globals)
    node = types.SimpleNamespace(workspace=str(Path(__file__).parent), device="cpu", samPredictor={})
    err = raises(loader, node, "medicosam_vit_b")
    assert err is not None and "vit_b_medicosam.pt" in str(err), "the loader does not look for vit_b_medicosam.pt"
    main = tree_ast(after[samm.SERVER_MAIN])
    assert '"/vit_b_medicosam.pt"' in ast.unparse(main).replace("'", '"'), "start-up check not pointed at MedicoSAM"


def check_samm_server(layout: str, before: dict[str, bytes], after: dict[str, bytes]) -> None:
    reg = "service/samm_server/model_registry.py"
    proto = "samm/SegmentAnyMedicalModel/samm_lib/protocol.py"
    old_ns, new_ns = run(before[reg], reg), run(after[reg], reg)
    old, new = old_ns["MODEL_DEFINITIONS"], new_ns["MODEL_DEFINITIONS"]
    assert type(new) is type(old) and len(new) == len(old) + 1
    assert [dataclasses.astuple(d) for d in new[:-1]] == [dataclasses.astuple(d) for d in old]
    assert dataclasses.astuple(new[-1]) == (
        "medicosam", "MedicoSAM",
        (("medicosam_vit_b", "ViT-B", "vit_b_medicosam.pt", "sam1", "vit_b", new_ns["SAM_PROMPTS"]),),
    )
    assert new_ns["weight_definition"]("medicosam_vit_b")[1].checkpoint == "vit_b_medicosam.pt"
    old_p, new_p = run(before[proto], proto), run(after[proto], proto)
    assert new_p["MODEL_IDS"] == (*old_p["MODEL_IDS"], "medicosam")
    assert new_p["WEIGHT_IDS"] == (*old_p["WEIGHT_IDS"], "medicosam_vit_b")
    assert {k: v for k, v in new_p.items() if k not in ("MODEL_IDS", "WEIGHT_IDS", "__builtins__")} == \
        {k: v for k, v in old_p.items() if k not in ("MODEL_IDS", "WEIGHT_IDS", "__builtins__")}


SLICER = "SegmentWithSAM/SegmentWithSAM.py"


def _add_items(data: bytes) -> list[str]:
    return [
        ast.literal_eval(n.args[0]) for n in ast.walk(tree_ast(data))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "addItem"
    ]


def _change_model(data: bytes, name: str) -> dict:
    """Run changeModel(name) against stubs; the widget's resulting state and the builder calls."""
    calls = []

    def builder(arch):
        return lambda checkpoint: calls.append((arch, checkpoint)) or types.SimpleNamespace(to=lambda device: None)

    fn = function(data, "SegmentWithSAMWidget", "changeModel", {
        "sam_model_registry": {a: builder(a) for a in ("vit_b", "vit_l", "vit_h")},
        "SamPredictor": lambda model: "predictor",
        "build_sam2": lambda *a, **k: "sam2",
    })
    widget = types.SimpleNamespace(checkpointFolder="/ckpt/", device="cpu")
    fn(widget, name)
    return {**vars(widget), "calls": calls}


def check_slicer(layout: str, before: dict[str, bytes], after: dict[str, bytes]) -> None:
    old, new = before[SLICER], after[SLICER]
    name = slicer_sws.DEFAULT_NAME
    if layout == "W2":
        assert _add_items(new) == [*_add_items(old), name]
        state = _change_model(new, name)
        assert state["modelVersion"] == "vit_b" and state["modelCheckpoint"] == "/ckpt/vit_b_medicosam.pt"
        assert state["calls"] == [("vit_b", "/ckpt/vit_b_medicosam.pt")] and state["sam"] == "predictor"
        for item in _add_items(old):
            assert _change_model(new, item) == _change_model(old, item), f"changeModel({item!r}) changed"
        return
    downloads = []
    slicer_stub = types.SimpleNamespace(util=types.SimpleNamespace(confirmOkCancelDisplay=lambda *a: True))
    logic = types.SimpleNamespace(downloadFileIntoCache=lambda *a: downloads.append(a) or "/tmp/x")
    base = type("Base", (), {"__init__": lambda self, *a: None})
    init = function(new, "SegmentWithSAMWidget", "__init__", {
        "os": __import__("os"),
        "shutil": types.SimpleNamespace(copyfile=lambda *a: downloads.append(a)),
        "slicer": slicer_stub,
        "SampleData": types.SimpleNamespace(SampleDataLogic=lambda: logic),
        "ScriptedLoadableModuleWidget": base,
        "VTKObservationMixin": base,
    })
    widget = types.SimpleNamespace(resourcePath=lambda rel: f"/nonexistent/Resources/{rel}")
    err = raises(init, widget, None)
    assert widget.modelVersion == "vit_b" and widget.modelName == "vit_b_medicosam.pt"
    assert isinstance(err, FileNotFoundError) and slicer_sws.GUARD_HINT in str(err), f"W1 __init__ gave {err!r}"
    assert not downloads, "W1 downloaded ViT-H into MedicoSAM's file"


CHECKS = {
    "N1": check_napari, "N2": check_napari, "N3": check_napari,
    "S2": check_samm_legacy, "S3": check_samm_legacy, "S4": check_samm_legacy,
    "samm-server": check_samm_server, "W1": check_slicer, "W2": check_slicer,
}


# --- one variant ------------------------------------------------------------------------------


def attempt(v: variants.Variant, base: Path) -> tuple[str, str]:
    """('patched', '') or ('refused', reason); raises AssertionError for a broken result."""
    adapter = ADAPTERS[v.layout]
    root = v.write(base / "in")
    before = snapshot(root)
    tree = Tree(root)
    try:
        layout = adapter.detect(tree)
        files = patching.transform_files(adapter, tree, layout, [adapter.default_entry()], {})
    except PatchError as e:
        assert snapshot(root) == before, "a refusal left the tree changed"
        return "refused", f"{type(e).__name__}: {e}".replace(str(root), "<root>")
    assert snapshot(root) == before, "transform_files wrote to the tree"
    assert layout.name == v.layout, f"detected {layout.name}"
    for rel, data in files.items():
        check_bytes(v.files[rel], data, rel)
    after = {**v.files, **files}
    CHECKS[v.layout](v.layout, v.files, after)

    if v.index % IDEMPOTENCE_EVERY:
        return "patched", ""
    # idempotence: the patched text, seen as a fresh tree (no manifest), needs nothing more
    again = v.write(base / "out")
    for rel, data in files.items():
        (again / rel).write_bytes(data)
    tree2 = Tree(again)
    layout2 = adapter.detect(tree2)
    assert layout2.name == layout.name, f"patched tree detected as {layout2.name}"
    for step in adapter.steps(tree2, layout2, [adapter.default_entry()], {}):
        assert run_codemod(step.transform, after[step.file], **step.kwargs) == after[step.file], \
            f"{step.transform.__name__} changes {step.file} again"
    IDEMPOTENCE["every transform a no-op on its own output"] += 1
    return "patched", ""


def _record(v: variants.Variant, outcome: str, reason: str) -> None:
    RESULTS[v.layout][outcome] += 1
    for mutation in v.mutations:
        MUTATION_RESULTS[mutation][outcome] += 1
    if outcome == "refused":
        REFUSALS[v.layout].append(f"{v.label}: {reason}")


@pytest.mark.parametrize("layout", list(variants.LAYOUTS))
def test_fuzz_layout(layout, tmp_path):
    start = time.perf_counter()
    failures = []
    for i in range(FULL or COUNTS[layout]):
        v = variants.variant(layout, i)
        try:
            outcome, reason = attempt(v, tmp_path / str(i))
        except AssertionError as e:
            failures.append(f"{v.label} (seed {v.seed}): {e}")
            continue
        _record(v, outcome, reason)
    TIMES[layout] = time.perf_counter() - start
    counts = RESULTS[layout]
    print(f"\n{layout}: {counts['patched']} patched, {counts['refused']} refused, {len(failures)} broken "
          f"({TIMES[layout]:.1f} s)")
    for line in REFUSALS[layout]:
        print("  refused", line)
    assert not failures, "broken patches:\n" + "\n".join(failures)


def test_fuzz_summary():
    """Runs after the per-layout tests (file order): the overall patched share."""
    if not RESULTS:
        pytest.skip("no per-layout fuzz results in this run")
    patched = sum(c["patched"] for c in RESULTS.values())
    refused = sum(c["refused"] for c in RESULTS.values())
    print("\nlayout        patched refused")
    for layout, c in RESULTS.items():
        print(f"{layout:<13} {c['patched']:>7} {c['refused']:>7}")
    print(f"{'total':<13} {patched:>7} {refused:>7}  ({patched / (patched + refused):.1%} patched)")
    print("by mutation:", ", ".join(f"{k} {c['patched']}/{c['patched'] + c['refused']}" for k, c in sorted(MUTATION_RESULTS.items())))
    print("re-patching the patched text:", dict(IDEMPOTENCE))
    print("time per layout:", ", ".join(f"{k} {t:.1f}s" for k, t in TIMES.items()))
    assert patched / (patched + refused) >= 0.9


# --- end to end: patch + unpatch restores reformatted trees byte for byte -----------------------

E2E_MUTATIONS = [
    ["user_entry_prepend", "black79", "quotes_single", "comments", "crlf"],
    ["reorder", "trailing_comma_add", "black40", "blank_lines", "crlf"],
    ["user_entry_append", "trailing_comma_remove", "black120", "quotes_mixed", "comments", "blank_lines", "bom"],
]
E2E_LAYOUTS = {"napari-sam": "N3", "samm": "S4", "slicer-segment-with-sam": "W2"}


@pytest.mark.parametrize("tool", list(E2E_LAYOUTS))
def test_patch_unpatch_restores_reformatted_trees(tool, tmp_path, checkpoints):
    layout = E2E_LAYOUTS[tool]
    adapter = ADAPTERS[layout]
    for n, mutations in enumerate(E2E_MUTATIONS):
        mutations = [mu for mu in mutations if not mu.startswith("black") or variants.black is not None]
        files = variants.mutate(variants.fixture_files(layout), mutations, seed=n)
        v = variants.Variant(layout, n, n, mutations, files)
        root = v.write(tmp_path / str(n))
        before = snapshot(root)
        result = patching.patch(adapter, root, checkpoint=checkpoints["plain"])
        assert result.changed and patching.status(adapter, root)["patched"], v.label
        patched = {rel: (root / rel).read_bytes() for rel in result.changed}
        CHECKS[layout](layout, v.files, {**v.files, **patched}, **({"placed": True} if tool == "napari-sam" else {}))
        again = patching.patch(adapter, root, checkpoint=checkpoints["plain"])  # re-patch: no file changes
        assert not again.changed, v.label
        patching.unpatch(adapter, root)
        assert snapshot(root) == before, f"{v.label}: unpatch did not restore the tree byte for byte"
        assert not any(Path(p).exists() for p in result.placed)
