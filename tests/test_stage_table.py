"""The stage table is the one source: dvc.yaml, its code deps, the CLI's stages and the MLflow params follow it."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from conftest import ROOT, TESTS
from pokesprite import cli, stage_table
from pokesprite.config import load_params
from pokesprite.stage_table import CURVES, IMAGES, STAGES, code_deps, compact, dvc_yaml, imported_files, upstream
from pokesprite.stages import Layout, stage_params


def test_committed_dvc_yaml_is_what_the_table_generates():
    committed = (ROOT / "dvc.yaml").read_text()
    assert committed == dvc_yaml(), ("dvc.yaml differs from pokesprite/stage_table.py: run "
                                     "`python -m pokesprite.stage_table --write dvc.yaml` and commit it")


def test_dvc_reads_the_generated_file_as_the_table_says(tmp_path, monkeypatch):
    """Real DVC parses the file: the same stages, deps, params and outs, and the same graph."""
    from dvc.repo import Repo

    monkeypatch.chdir(tmp_path)
    Repo.init(tmp_path, no_scm=True)
    (tmp_path / "dvc.yaml").write_text(dvc_yaml())
    repo = Repo(tmp_path)
    by_name = {s.name: s for s in repo.index.stages}
    assert list(by_name) == list(STAGES)
    for name, spec in STAGES.items():
        stage = by_name[name]
        paths = [d.def_path for d in stage.deps if type(d).__name__ != "ParamsDependency"]
        assert paths == [*spec.deps, *code_deps(spec)]
        params = [p for d in stage.deps if type(d).__name__ == "ParamsDependency" for p in d.params]
        assert params == list(spec.params)
        assert [o.def_path for o in stage.outs] == [*spec.outs, *spec.files, spec.metrics]
        assert all(not o.use_cache for o in stage.outs if o.def_path in (*spec.files, spec.metrics))
        upstream_in_dvc = {n.name for n in nx.descendants(repo.index.graph, stage)}
        assert upstream_in_dvc == set(upstream(name)), name
    repo.close()


def test_table_order_runs_every_stage_after_what_it_reads():
    seen: list[str] = []
    for name, spec in STAGES.items():
        assert set(upstream(name)) <= set(seen), name
        for dep in spec.deps:  # each data dep is data/ or inside an earlier stage's output
            assert dep == "data" or any(dep == o or dep.startswith(o + "/") for s in seen for o in STAGES[s].outs), dep
        seen.append(name)
    assert upstream("evaluate") == ["preprocess", "reference", "alignment", "vae", "diffusion", "finetune"]
    assert upstream("vae") == ["preprocess"] and upstream("preprocess") == []


def test_outs_follow_the_layout_and_every_plot_is_written_by_a_stage():
    layout = Layout(".")
    for name, spec in STAGES.items():
        assert spec.outs == (f"outputs/{name}",) and Path(spec.outs[0]) == layout.stage_dir(name)
    written = {f for s in STAGES.values() for f in s.files}
    in_outs = lambda path: any(path.startswith(o + "/") for s in STAGES.values() for o in s.outs)  # noqa: E731
    for curve in CURVES:
        assert curve.file in written or in_outs(curve.file), curve
    assert set(IMAGES) <= written
    assert len({c.title for c in CURVES}) == len(CURVES)
    assert len({(c.file, c.y) for c in CURVES}) == len(CURVES)  # each curve once
    yaml_text = dvc_yaml()
    assert yaml_text.count("plots/sample_grid.png") == 2  # the evaluate stage's out, and one top-level plot


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_depends_on_the_config_module_and_its_own_code(name):
    deps = code_deps(STAGES[name])
    assert "pokesprite/config.py" in deps and "pokesprite/stages.py" in deps
    assert {"flows/run.py", "flows/pipeline.py", "pokesprite/stage_table.py"} <= set(deps)
    assert "flows/server.py" not in deps  # how make repro hosts Prefect changes no stage's output


def test_code_deps_follow_each_stage_and_no_further():
    """Known answers: the VAE stage does not depend on the U-Net or the evaluation; evaluation
    depends on the models and sampler it loads through the pipeline and on the registered model's
    code, not on how stage 2 trains."""
    files = lambda name: expand(code_deps(STAGES[name]))  # noqa: E731
    vae = files("vae")
    assert {"pokesprite/train/vae.py", "pokesprite/train/loop.py", "pokesprite/models/vae.py",
            "pokesprite/losses.py"} <= vae
    assert not vae & {"pokesprite/models/unet.py", "pokesprite/train/diffusion.py", "pokesprite/train/finetune.py",
                      "pokesprite/evaluation/evaluate.py", "pokesprite/registry.py"}
    evaluate = files("evaluate")
    assert {"pokesprite/diffusion/samplers.py", "pokesprite/models/unet.py", "pokesprite/pipeline.py",
            "pokesprite/checkpoints.py", "pokesprite/registry.py", "pokesprite/mlflow_model.py",
            "pokesprite/evaluation/evaluate.py"} <= evaluate
    assert "pokesprite/train/diffusion.py" not in evaluate
    assert "pokesprite/train/vae.py" not in files("preprocess")


def expand(deps: list[str]) -> set[str]:
    """Deps as the .py files they cover (a folder: every .py file under it)."""
    out = set()
    for dep in deps:
        path = ROOT / dep
        out |= {p.relative_to(ROOT).as_posix() for p in path.rglob("*.py")} if path.is_dir() else {dep}
    return out


LAZY_IMPORT = re.compile(r"^\s+(?:from\s+(pokesprite[\w.]*)\s+import|import\s+(pokesprite[\w.]*))", re.M)
# One interpreter loads the heavy third-party packages once, then forks a child per stage: each child
# starts with no first-party module loaded, imports that stage's modules and reports the
# first-party files Python loaded.
LOADED = """
import importlib, json, os, sys
import mlflow, prefect, torch, transformers  # noqa: F401  (third-party only)
assert not any(m.split(".")[0] in ("pokesprite", "flows") for m in sys.modules)
root = os.getcwd()
results = {}
for arg in sys.argv[1:]:
    name, modules = arg.split("=")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        for m in modules.split(","):
            importlib.import_module(m)
        paths = (getattr(m, "__file__", None) for m in list(sys.modules.values()))
        files = sorted({os.path.relpath(f, root) for f in paths if f and os.path.abspath(f).startswith(root + os.sep)})
        os.write(w, json.dumps(files).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        results[name] = json.loads(f.read())
    assert os.waitpid(pid, 0)[1] == 0, name
print(json.dumps(results))
"""


def test_code_deps_cover_every_first_party_file_python_loads():
    """Import, with no first-party module loaded before, the command's modules and the modules the
    stage's function imports: every first-party file Python loads must be among the stage's deps."""
    args = []
    for name, spec in STAGES.items():
        lazy = [a or b for a, b in LAZY_IMPORT.findall(inspect.getsource(spec.run))]
        args.append(f"{name}=" + ",".join(["flows.run", "flows.pipeline", *lazy]))
    proc = subprocess.run([sys.executable, "-c", LOADED, *args], cwd=ROOT, text=True, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(loaded) == set(STAGES)
    for name, files in loaded.items():
        first_party = {f for f in files if Path(f).parts[0] in ("pokesprite", "flows")
                       and (ROOT / f).stat().st_size > 0}  # empty package markers are left out on purpose
        assert "pokesprite/stages.py" in first_party and "flows/pipeline.py" in first_party, name
        missing = first_party - expand(code_deps(STAGES[name]))
        assert not missing, f"{name}: dvc.yaml deps miss {sorted(missing)}"


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_imported_files_and_compact_on_a_known_package(tmp_path):
    write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nimport pkg.b\nfrom . import c\n\ndef f():\n    from pkg.sub import d\n",
        "pkg/b.py": "import json\n",
        "pkg/c.py": "",
        "pkg/sub/__init__.py": "from .e import x\n",
        "pkg/sub/d.py": "",
        "pkg/sub/e.py": "x = 1\n",
        "pkg/unused.py": "",
        "pkg/disp.py": ("from pkg import c\n\ndef run_one():\n    from pkg import b\n    helper()\n\n"
                        "def helper():\n    import pkg.sub.d\n\ndef run_two():\n    import pkg.unused\n"),
        "other/x.py": "",
    })
    rel = lambda files: {p.relative_to(tmp_path).as_posix() for p in files}  # noqa: E731
    found = imported_files(["pkg.a"], root=tmp_path, packages=("pkg",))
    assert rel(found) == {"pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/c.py", "pkg/sub/__init__.py",
                          "pkg/sub/d.py", "pkg/sub/e.py"}
    assert compact(found, tmp_path) == ["pkg/a.py", "pkg/b.py", "pkg/sub"]  # empty files left out
    tree = ast.parse((tmp_path / "pkg/disp.py").read_text())
    assert stage_table.reachable(tree, ["run_one"]) == {"run_one", "helper"}
    one = imported_files(["pkg.disp"], skip={"pkg.disp": {"run_two"}}, root=tmp_path, packages=("pkg",))
    assert rel(one) == {"pkg/__init__.py", "pkg/disp.py", "pkg/c.py", "pkg/b.py", "pkg/sub/__init__.py",
                        "pkg/sub/d.py", "pkg/sub/e.py"}
    both = imported_files(["pkg.disp"], root=tmp_path, packages=("pkg",))
    assert rel(both) == rel(one) | {"pkg/unused.py"}
    # a file loaded by path counts with the packages above it (conservative) and its own imports
    assert rel(imported_files([], files=["pkg/sub/d.py"], root=tmp_path, packages=("pkg",))) == {
        "pkg/__init__.py", "pkg/sub/__init__.py", "pkg/sub/d.py", "pkg/sub/e.py"}


def test_check_command_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "dvc.yaml"
    stale.write_text(dvc_yaml().replace("      - pokesprite/config.py\n", "", 1))
    assert stage_table.main(["--check", str(stale)]) == 1
    out = capsys.readouterr()
    assert "-      - pokesprite/config.py" not in out.out and "+      - pokesprite/config.py" in out.out
    assert "run python -m pokesprite.stage_table --write" in out.err
    assert stage_table.main(["--write", str(stale)]) == 0 and stage_table.main(["--check", str(stale)]) == 0


def test_cli_stage_choices_and_order_come_from_the_table(tmp_path):
    assert cli.stage_choices() == ("all", "1", "2", "3", "eval", *STAGES)
    assert cli.build_parser().parse_args(["train", "--stage", "reference"]).stage == "reference"
    layout = Layout(tmp_path)
    assert cli.stages_to_run("all", None, layout) == list(STAGES)
    assert cli.stages_to_run("all", "diffusion", layout) == ["diffusion", "finetune", "evaluate"]
    # the unnumbered stages a stage reads run first when their outputs are missing
    assert cli.stages_to_run("3", None, layout) == ["preprocess", "alignment", "finetune"]
    assert cli.stages_to_run("eval", None, layout) == ["preprocess", "reference", "alignment", "evaluate"]
    for out in ("preprocess", "alignment"):
        (tmp_path / "outputs" / out).mkdir(parents=True)
    assert cli.stages_to_run("3", None, layout) == ["finetune"]
    assert cli.stages_to_run("1", "vae", layout) == ["vae"]
    with pytest.raises(ValueError, match="holds a vae checkpoint but --stage 2 is diffusion"):
        cli.stages_to_run("2", "vae", layout)


def test_stage_params_are_exactly_the_listed_keys():
    params = load_params(TESTS / "tiny_params.yaml")
    logged = stage_params(params, STAGES["reference"].params)
    assert logged == {"evaluate.seed": 0, "evaluate.kid_subsets": 5, "evaluate.kid_subset_size": 10,
                      "evaluate.candidates": 32, "evaluate.scorer_epochs": 20, "evaluate.scorer_dim": 16}
    alignment = stage_params(params, STAGES["alignment"].params)
    assert alignment["finetune.alignment.image_size"] == params.finetune.alignment.image_size
    assert not any(k.startswith(("finetune.train", "vae.", "text.", "data.")) for k in alignment)
    vae = stage_params(params, STAGES["vae"].params)  # augmentation is the VAE's: no other stage reruns for it
    assert vae["data.augment.hflip_prob"] == 0.5 and vae["data.background"] == [255, 255, 255]
    assert "data.split" not in vae and "data.image_size" not in vae
    readers = [name for name, spec in STAGES.items() if any(k in ("data", "data.augment") for k in spec.params)]
    assert readers == ["vae"]
    data_keys = {k for spec in STAGES.values() for k in spec.params if k.split(".")[0] == "data"}
    assert data_keys == {f"data.{f.name}" for f in dataclasses.fields(params.data)}  # every data key has a reader


def test_code_hashes_leave_out_byte_code_caches(tmp_path):
    """Python writes __pycache__/*.pyc (with timestamps) beside the code a stage depends on: they must not
    change the stage's fingerprint, in resume.json, nor DVC's hash (.dvcignore); a source edit must."""
    import hashlib

    from pokesprite.stage_table import _hash_tree

    code = tmp_path / "flows"
    code.mkdir()
    (code / "run.py").write_text("print('a')\n")

    def digest():
        h = hashlib.sha256()
        _hash_tree(h, code)
        return h.hexdigest()

    before = digest()
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "run.cpython-311.pyc").write_bytes(b"\x00stamp")
    assert digest() == before
    (code / "run.py").write_text("print('b')\n")
    assert digest() != before
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


def test_the_resume_fingerprint_changes_with_the_stages_code(tmp_path, monkeypatch):
    """resume.json's fingerprint covers the stage's code (code_deps), as DVC's hash does: a last.pt
    trained by other code must not be resumed."""
    import shutil

    code = tmp_path / "code"
    for pkg in ("pokesprite", "flows"):
        shutil.copytree(ROOT / pkg, code / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(stage_table, "ROOT", code)
    layout = Layout(tmp_path / "project")
    layout.processed.mkdir(parents=True)
    (layout.processed / "index.csv").write_text("number,name,split,caption\n")
    params, spec = load_params(TESTS / "tiny_params.yaml"), STAGES["vae"]
    before = stage_table.fingerprint(spec, params, layout)
    assert stage_table.fingerprint(spec, params, layout) == before
    own = code / "pokesprite" / "train" / "vae.py"
    assert "pokesprite/train/vae.py" in code_deps(spec)
    own.write_text(own.read_text() + "\n# an edit\n")
    assert stage_table.fingerprint(spec, params, layout) != before
