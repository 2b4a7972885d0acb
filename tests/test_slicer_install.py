"""SegmentWithSAM where Slicer's Extension Manager put it, on Linux, macOS and Windows.

Each test builds a fake install the way Slicer lays one out (see medico_adapters/locations.py):
``<Slicer>/<org>/Extensions-<rev>/SegmentWithSAM/lib/Slicer-X.Y/qt-scripted-modules/`` holding the
module and its ``Resources``, the revision settings ``Slicer-<rev>.ini`` beside it, for macOS the
same inside ``Slicer.app/Contents``, under a temporary HOME / LOCALAPPDATA / file-system root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medico_adapters import locations
from medico_adapters.adapters.slicer_sws import ADAPTER
from medico_adapters.cli import main
from medico_adapters.engine import Tree
from medico_adapters.errors import AmbiguousInstallError, LayoutError, PatchError
from medico_adapters.patching import patch, status, unpatch
from tests.helpers import FIXTURES, slicer_stand_ins, snapshot

REV = "32448"
SLICER = "5.6"
PLACED = f"SegmentWithSAM/lib/Slicer-{SLICER}/model_checkpoints/vit_b_medicosam.pt"


def install_extension(extensions: Path, layout: str = "W2", source: bytes | None = None) -> Path:
    """SegmentWithSAM as the Extension Manager unpacks it into ``extensions``; returns the module."""
    extension = extensions / "SegmentWithSAM"
    modules = extension / f"lib/Slicer-{SLICER}/qt-scripted-modules"
    (modules / "Resources/UI").mkdir(parents=True)
    (modules / "Resources/Icons").mkdir()
    module = modules / "SegmentWithSAM.py"
    module.write_bytes(source if source is not None else (FIXTURES / f"slicer_sws/{layout}/SegmentWithSAM/SegmentWithSAM.py").read_bytes())
    (modules / "Resources/UI/SegmentWithSAM.ui").write_text('<ui version="4.0"><widget class="qMRMLWidget" name="SegmentWithSAM"/></ui>\n')
    (modules / "Resources/Icons/SegmentWithSAM.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (extension / f"share/Slicer-{SLICER}").mkdir(parents=True)
    (extension / f"share/Slicer-{SLICER}/SegmentWithSAM.s4ext").write_text("scm git\nscmrevision 0d3c0a1\n")
    (extensions / "SegmentWithSAM.s4ext").write_text("scm git\nscmrevision 0d3c0a1\n")
    # the module downloads SAM ViT-B there on its first start; its folder is the module's checkpoint folder
    (extension / f"lib/Slicer-{SLICER}/model_checkpoints").mkdir()
    (extension / f"lib/Slicer-{SLICER}/model_checkpoints/sam_vit_b_01ec64.pth").write_bytes(b"stand-in")
    return module


def revision_settings(org_dir: Path, **values: str) -> Path:
    """A Slicer-<rev>.ini as QSettings writes it (paths inside the Slicer folder are relative)."""
    org_dir.mkdir(parents=True, exist_ok=True)
    lines = ["[General]", "LastRevision=" + REV]
    sections: dict[str, list[str]] = {}
    for key, value in values.items():
        section, name = key.split("_", 1)
        sections.setdefault(section, []).append(f"{name}={value}")
    for section, entries in sections.items():
        lines += ["", f"[{section}]", *entries]
    path = org_dir / f"Slicer-{REV}.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


class FakeMachine:
    """One OS's fake install: the environment the search reads, and the folders a user may name."""

    def __init__(self, tmp: Path, os_layout: str):
        self.root = tmp / "fs"
        self.home = tmp / "fs/home/ana"
        self.home.mkdir(parents=True)
        variables = {"HOME": str(self.home)}
        if os_layout == "linux":
            self.slicer = self.home / "Slicer-5.6.2-linux-amd64"
            org = self.slicer / "slicer.org"
            self.extensions = org / f"Extensions-{REV}"
            revision_settings(org, Extensions_InstallPath=f"slicer.org/Extensions-{REV}",
                              Modules_AdditionalPaths=f"slicer.org/Extensions-{REV}/SegmentWithSAM/lib/Slicer-{SLICER}/qt-scripted-modules")
            self.named = [self.slicer, org]
        elif os_layout == "macos":
            app = self.root / "Applications/Slicer.app"
            self.slicer = app / "Contents"
            self.extensions = self.slicer / f"Extensions-{REV}"
            revision_settings(self.slicer / "slicer.org", Extensions_InstallPath=f"Extensions-{REV}")
            self.named = [app, self.slicer]
        else:
            local = self.home / "AppData/Local"
            variables = {"USERPROFILE": str(self.home), "LOCALAPPDATA": str(local)}
            self.slicer = local / "NA-MIC/Slicer 5.6.2"
            org = self.slicer / "slicer.org"
            self.extensions = org / f"Extensions-{REV}"
            revision_settings(org, Extensions_InstallPath=f"slicer.org/Extensions-{REV}")
            self.named = [self.slicer, org]
        self.env = locations.Env(os_layout, variables, root=self.root)
        self.module = install_extension(self.extensions)
        modules = self.module.parent
        self.named += [self.extensions, self.extensions / "SegmentWithSAM", modules.parents[1], modules.parent, modules, self.module]


OSES = ["linux", "macos", "windows"]


@pytest.fixture(params=OSES)
def machine(request, tmp_path, monkeypatch):
    fake = FakeMachine(tmp_path, request.param)
    monkeypatch.setattr(locations, "current_env", lambda: fake.env)
    return fake


# --- found without --path, and with --path at every level -----------------------------------


def test_found_without_path(machine):
    assert ADAPTER.installed(machine.env) == [machine.extensions]
    assert ADAPTER.locate() == machine.extensions
    layout = ADAPTER.detect(Tree(machine.extensions))
    assert layout.name == "W2" and layout.files == (f"SegmentWithSAM/lib/Slicer-{SLICER}/qt-scripted-modules/SegmentWithSAM.py",)


def test_path_at_every_level_names_the_same_tree(machine):
    for level in machine.named:
        assert ADAPTER.resolve(level) == machine.extensions, level
    assert ADAPTER.resolve(machine.extensions) == machine.extensions  # a tree root resolves to itself


def test_checkpoint_goes_where_the_installed_module_computes_it(machine):
    tree = Tree(machine.extensions)
    target = ADAPTER.checkpoint_path(tree, ADAPTER.detect(tree), ADAPTER.default_entry(), {})
    assert target == machine.extensions / PLACED


def test_patch_without_path_then_the_module_loads_the_placed_checkpoint(machine, checkpoints, vit_b_state, monkeypatch, capsys):
    before = snapshot(machine.root)
    assert main(["patch", "slicer-segment-with-sam", "--checkpoint", str(checkpoints["training"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(machine.extensions) and report["layout"] == "W2"
    assert report["placed"] == [str(machine.extensions / PLACED)]

    modules = machine.module.parent
    slicer_stand_ins(monkeypatch, modules)
    namespace: dict = {"__name__": "SegmentWithSAM"}
    exec(compile(machine.module.read_text(), str(machine.module), "exec"), namespace)
    widget = namespace["SegmentWithSAMWidget"]()
    widget.changeModel("MedicoSAM (ViT-B)")
    loaded = widget.sam.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in vit_b_state.items())
    assert Path(widget.modelCheckpoint).resolve() == (machine.extensions / PLACED).resolve()

    # status and unpatch through two other levels of the same install
    assert main(["status", "slicer-segment-with-sam", "--path", str(modules), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["patched"] and st["path"] == str(machine.extensions) and st["checkpoints"][0]["matching"]
    assert main(["unpatch", "slicer-segment-with-sam", "--path", str(machine.named[0])]) == 0
    assert snapshot(machine.root) == before


def test_relative_path_from_another_folder(machine, checkpoints, monkeypatch, capsys):
    before = snapshot(machine.root)
    monkeypatch.chdir(machine.extensions / "SegmentWithSAM")
    assert main(["patch", "slicer-segment-with-sam", "--path", "lib", "--checkpoint", str(checkpoints["plain"])]) == 0
    assert capsys.readouterr().out.startswith(f"{machine.extensions}: slicer-segment-with-sam layout W2")
    monkeypatch.chdir(machine.root)
    rel = os.path.relpath(machine.module, machine.root)
    assert main(["status", "slicer-segment-with-sam", "--path", rel, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["patched"]
    assert main(["unpatch", "slicer-segment-with-sam", "--path", os.path.relpath(machine.extensions, machine.root)]) == 0
    assert snapshot(machine.root) == before


# --- more than one, none, and the places they can hide ---------------------------------------


def test_two_slicers_with_the_extension_are_listed_and_refused(tmp_path, monkeypatch, capsys):
    fake = FakeMachine(tmp_path, "windows")
    newer = Path(fake.env.vars["LOCALAPPDATA"]) / "slicer.org/Slicer 5.8.1/slicer.org/Extensions-33241"
    install_extension(newer)
    monkeypatch.setattr(locations, "current_env", lambda: fake.env)
    with pytest.raises(AmbiguousInstallError) as e:
        ADAPTER.locate()
    assert str(fake.extensions) in str(e.value) and str(newer) in str(e.value) and "--path" in str(e.value)
    assert main(["status", "slicer-segment-with-sam"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(newer) in err and str(fake.extensions) in err
    assert ADAPTER.resolve(newer.parents[1]) == newer  # --path picks one


def test_nothing_installed_says_where_it_looked(tmp_path, monkeypatch, capsys):
    env = locations.Env("linux", {"HOME": str(tmp_path)}, root=tmp_path)
    with pytest.raises(PatchError, match="found no SegmentWithSAM installed by Slicer's Extension Manager"):
        ADAPTER.locate(env)
    monkeypatch.setattr(locations, "current_env", lambda: env)
    assert main(["patch", "slicer-segment-with-sam", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/Slicer*" in err and "--path" in err


def test_opt_and_a_custom_install_path_from_the_user_settings(tmp_path):
    root, home = tmp_path / "fs", tmp_path / "fs/home/bo"
    opt_extensions = root / "opt/Slicer-5.6.2-linux-amd64/slicer.org" / f"Extensions-{REV}"
    install_extension(opt_extensions)
    custom = tmp_path / "data/slicer-extensions"
    install_extension(custom)
    # a build that keeps its settings with the user's, naming its extensions folder
    revision_settings(home / ".config/slicer.org", Extensions_InstallPath=f'"{custom}"')
    env = locations.Env("linux", {"HOME": str(home)}, root=root)
    assert ADAPTER.installed(env) == [opt_extensions, custom]
    xdg = locations.Env("linux", {"HOME": str(tmp_path / "elsewhere"), "XDG_CONFIG_HOME": str(home / ".config")}, root=tmp_path / "none")
    assert ADAPTER.installed(xdg) == [custom]


def test_a_git_clone_in_additional_module_paths_is_found(tmp_path):
    clone = tmp_path / "src/SlicerSegmentWithSAM"
    shutil.copytree(FIXTURES / "slicer_sws/W1", clone)
    home = tmp_path / "home"
    slicer = home / "Slicer-5.6.2-linux-amd64"
    revision_settings(slicer / "slicer.org", Modules_AdditionalPaths=f"{clone / 'SegmentWithSAM'}, slicer.org/Extensions-{REV}/Other/lib")
    env = locations.Env("linux", {"HOME": str(home)}, root=tmp_path / "none")
    assert ADAPTER.installed(env) == [clone]
    assert ADAPTER.resolve(slicer) == clone
    assert ADAPTER.detect(Tree(clone)).name == "W1"


def test_macos_app_in_the_users_applications(tmp_path):
    home = tmp_path / "Users/cy"
    extensions = home / "Applications/Slicer-5.6.2.app/Contents" / f"Extensions-{REV}"
    install_extension(extensions)
    env = locations.Env("macos", {"HOME": str(home)}, root=tmp_path / "none")
    assert ADAPTER.installed(env) == [extensions]


def test_windows_home_falls_back_to_userprofile_for_localappdata(tmp_path):
    profile = tmp_path / "Users/di"
    extensions = profile / "AppData/Local/slicer.org/Slicer 5.8.1/slicer.org/Extensions-33241"
    install_extension(extensions)
    env = locations.Env("windows", {"USERPROFILE": str(profile), "HOME": str(tmp_path / "msys-home")}, root=tmp_path / "none")
    assert ADAPTER.installed(env) == [extensions]
    admin = tmp_path / "Program Files/Slicer 5.6.2/slicer.org/Extensions-32448"
    install_extension(admin)
    env = locations.Env("windows", {"Userprofile": str(tmp_path / "x"), "ProgramFiles": str(tmp_path / "Program Files")}, root=tmp_path / "none")
    assert ADAPTER.installed(env) == [admin]


def test_an_earlier_patch_from_qt_scripted_modules_keeps_its_state_there(tmp_path, checkpoints, monkeypatch):
    extensions = tmp_path / f"Extensions-{REV}"
    modules = install_extension(extensions).parent
    with monkeypatch.context() as m:  # the kit before it knew the layout: --path was the tree root
        m.setattr(ADAPTER, "resolve", lambda path: Path(path))
        patch(ADAPTER, modules, checkpoint=checkpoints["plain"])
    assert (modules / ".medico-adapters/manifest.json").is_file()
    assert ADAPTER.resolve(extensions) == modules
    assert status(ADAPTER, ADAPTER.resolve(extensions))["patched"]
    unpatch(ADAPTER, ADAPTER.resolve(modules.parents[2]))
    assert ADAPTER.resolve(modules) == extensions


def test_not_a_module_anywhere_below(tmp_path):
    (tmp_path / "lib/Slicer-5.6/qt-scripted-modules").mkdir(parents=True)
    with pytest.raises(LayoutError, match="no SegmentWithSAM module here or below"):
        ADAPTER.resolve(tmp_path)
    assert ADAPTER.resolve(tmp_path / "missing") == tmp_path / "missing"  # left for the caller to report


# --- Qt's settings files -----------------------------------------------------------------------


def test_qsettings_values_as_qt_writes_them(tmp_path):
    ini = tmp_path / "Slicer-1.ini"
    ini.write_bytes(
        b"[General]\nLastPath=@Invalid()\nAt=@@home\n\n"
        b"[Modules]\nAdditionalPaths=slicer.org/Extensions-1/A/lib, \"/data/with, comma\", /caf\\xe9/m ; comment\n"
        b"IgnoreModules=@Invalid()\n[Extensions]\nInstallPath=\"C:\\\\Users\\\\x\"\nSub\\Key=1\n"
    )
    values = locations.read_qsettings(ini)
    assert values["Modules/AdditionalPaths"] == ["slicer.org/Extensions-1/A/lib", "/data/with, comma", "/caf\u00e9/m"]
    assert values["LastPath"] == [] and values["Modules/IgnoreModules"] == [] and values["At"] == ["@home"]
    assert values["Extensions/InstallPath"] == ["C:\\Users\\x"] and values["Extensions/Sub/Key"] == ["1"]
    home = tmp_path / "Slicer"
    assert locations.SettingsFile(ini, home).paths("Modules/AdditionalPaths") == [
        home / "slicer.org/Extensions-1/A/lib", Path("/data/with, comma"), Path("/caf\u00e9/m")]
    assert locations.SettingsFile(ini, None).paths("Modules/AdditionalPaths") == [Path("/data/with, comma"), Path("/caf\u00e9/m")]
    assert locations.read_qsettings(tmp_path / "missing.ini") == {}


# --- an Extension Manager update over the patch ---------------------------------------------


def _new_release() -> bytes:
    source = (FIXTURES / "slicer_sws/W2/SegmentWithSAM/SegmentWithSAM.py").read_text()
    return source.replace('            self.ui.modelDropDown.addItem("SAM-2 Large")\n',
                          '            self.ui.modelDropDown.addItem("SAM-2 Large")\n            self.ui.modelDropDown.addItem("SAM-2 Tiny")\n').encode()


def _update(extensions: Path, source: bytes) -> None:
    """What the Extension Manager does: remove the extension folder, unpack the new release."""
    shutil.rmtree(extensions / "SegmentWithSAM")
    install_extension(extensions, source=source)


def test_an_update_is_told_apart_from_an_edit(tmp_path, checkpoints):
    extensions = tmp_path / f"Extensions-{REV}"
    module = install_extension(extensions)
    upstream = module.read_bytes()
    patch(ADAPTER, ADAPTER.resolve(module), checkpoint=checkpoints["plain"])
    tree = Tree(extensions)
    rel = ADAPTER.detect(tree).files[0]
    patched = module.read_bytes()
    assert not ADAPTER.upstream_replaced(tree, rel, patched)
    assert not ADAPTER.upstream_replaced(tree, rel, patched.replace(b"SAM (ViT-H)", b"SAM (ViT-H, mine)"))
    assert not ADAPTER.upstream_replaced(tree, rel, b"def broken(:\n")
    assert not ADAPTER.upstream_replaced(tree, rel, b"print('not SegmentWithSAM')\n")
    assert ADAPTER.upstream_replaced(tree, rel, upstream)
    assert ADAPTER.upstream_replaced(tree, rel, _new_release())

    _update(extensions, _new_release())
    # the state lives in Extensions-<rev>, which the update leaves alone
    tree = Tree(extensions)
    assert tree.manifest and ADAPTER.upstream_replaced(tree, rel, module.read_bytes())
    assert status(ADAPTER, extensions)["checkpoints"][0]["present"] is False


def test_patch_reapplies_after_an_update(tmp_path, checkpoints):
    extensions = tmp_path / f"Extensions-{REV}"
    install_extension(extensions)
    patch(ADAPTER, extensions, checkpoint=checkpoints["plain"])
    _update(extensions, _new_release())
    updated = snapshot(extensions / "SegmentWithSAM")
    report = status(ADAPTER, extensions)
    assert not report["patched"] and "update" in next(iter(report["files"].values()))
    patch(ADAPTER, extensions, checkpoint=checkpoints["plain"])
    report = status(ADAPTER, extensions)
    assert report["patched"] and report["checkpoints"][0]["matching"]
    assert b"SAM-2 Tiny" in (extensions / ADAPTER.detect(Tree(extensions)).files[0]).read_bytes()
    unpatch(ADAPTER, extensions)  # back to the new release, not the one patched first
    assert snapshot(extensions / "SegmentWithSAM") == updated and not (extensions / ".medico-adapters").exists()


# --- install says how Slicer will load a clone ------------------------------------------------


def test_install_on_a_clone_says_how_slicer_loads_it(tmp_path, checkpoints, monkeypatch, capsys):
    clone = shutil.copytree(FIXTURES / "slicer_sws/W2", tmp_path / "SlicerSegmentWithSAM")
    monkeypatch.setattr(locations, "current_env", lambda: locations.Env("linux", {"HOME": str(tmp_path / "h")}, root=tmp_path / "none"))
    assert main(["install", "slicer-segment-with-sam", "--path", str(clone / "SegmentWithSAM"), "--checkpoint", str(checkpoints["plain"]), "--json"]) == 0
    message = json.loads(capsys.readouterr().out)["message"]
    assert "Additional module paths" in message and str(clone / "SegmentWithSAM") in message and "Extension Manager" in message

    fake = FakeMachine(tmp_path / "m", "linux")
    monkeypatch.setattr(locations, "current_env", lambda: fake.env)
    assert main(["unpatch", "slicer-segment-with-sam", "--path", str(clone)]) == 0
    capsys.readouterr()
    assert main(["install", "slicer-segment-with-sam", "--path", str(clone), "--checkpoint", str(checkpoints["plain"]), "--json"]) == 0
    message = json.loads(capsys.readouterr().out)["message"]
    assert str(fake.extensions) in message and "only one" in message


# --- as a user runs it on Linux: the real CLI, no --path ---------------------------------------


def test_cli_finds_a_tarball_install_under_home(tmp_path, checkpoints):
    fake = FakeMachine(tmp_path, "linux")
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CONFIG_HOME",)}
    env.update(HOME=str(fake.home), MEDICO_ADAPTERS_CACHE=str(tmp_path / "cache"))
    before = snapshot(fake.root)

    def cli(*args, cwd=None):
        return subprocess.run([sys.executable, "-m", "medico_adapters", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)

    done = cli("patch", "slicer-segment-with-sam", "--checkpoint", checkpoints["plain"])
    assert done.returncode == 0, done.stderr
    assert f"{fake.extensions}: slicer-segment-with-sam layout W2" in done.stdout
    st = cli("status", "slicer-segment-with-sam", "--path", "Slicer-5.6.2-linux-amd64", "--json", cwd=fake.home)
    assert json.loads(st.stdout)["patched"], st.stderr
    undo = cli("unpatch", "slicer-segment-with-sam")
    assert undo.returncode == 0, undo.stderr
    assert snapshot(fake.root) == before
