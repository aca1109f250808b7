"""The threat model and the layering, enforced (issue 12).

The attacker may only ever receive the model and the shared update: every attack entry
point takes exactly (model or bundle, shared update, config). The arrows run one way:
faces (app.py, labui) -> attacks (dager, dlg) -> fedclient. Imports are read from the
source (module level and inside functions), so a lazy import cannot slip past.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RULES: dict[str, tuple[str, ...]] = {
    # package -> top-level packages it must never import
    # fedclient is the simulated client: no attack, no face, no argument parsing or plotting
    "fedclient": ("gradio", "labui", "dager", "dlg", "app", "labcli", "argparse", "plotly"),
    "dager": ("gradio", "labui", "dlg", "app"),
    "dlg": ("gradio", "labui", "app"),
    # labcli holds the torch-free pieces of both command lines; it knows no attack
    "labcli": ("gradio", "labui", "dager", "dlg", "app"),
}


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports, anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(RULES))
def test_packages_import_only_downwards(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imports(path) & set(RULES[package])
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {', '.join(sorted(bad))}")
    assert not offenders, "layering broken:\n" + "\n".join(offenders)


def test_the_rules_see_real_imports() -> None:
    """The checker itself works: app.py imports gradio and the attacks."""
    found = _imports(ROOT / "app.py")
    assert {"gradio", "fedclient"} <= found


def test_cli_pieces_load_no_heavy_library() -> None:
    """labcli and fedclient's package answer a bad argument before torch or plotly loads (issue 13)."""
    import subprocess
    import sys

    code = (
        "import sys, labcli.common, labcli.outputs, labcli.runtime, labcli.sweep, labcli.sweepfiles, "
        "fedclient, fedclient.errors, fedclient.threads, fedclient.sweepcli;"
        "print(sorted(m for m in ('torch', 'plotly', 'gradio', 'argparse') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['argparse']"  # labcli parses arguments; nothing heavy


def test_importing_the_library_sets_no_process_wide_state() -> None:
    """Library code sets nothing at import that outlives a call (PIL's pixel limit, torch threads)."""
    import subprocess
    import sys

    code = (
        "import PIL.Image, torch; before = (PIL.Image.MAX_IMAGE_PIXELS, torch.get_num_threads());"
        "import dlg.images, dlg.gif, dlg.metrics, dlg.attack, dlg.text, dager.zoo, dager.attack, fedclient.defenses;"
        "print(before == (PIL.Image.MAX_IMAGE_PIXELS, torch.get_num_threads()))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_moved_names_still_import_from_their_old_paths() -> None:
    """The sweep writers and CLI helpers left fedclient; their old names resolve to the new homes."""
    import fedclient
    import fedclient.sweep
    import fedclient.sweepcli
    import labcli.sweep
    import labcli.sweepfiles

    for name in ("write_csv", "plot_sweep", "save_plot"):
        assert getattr(fedclient.sweep, name) is getattr(labcli.sweepfiles, name)
        assert getattr(fedclient, name) is getattr(labcli.sweepfiles, name)
    for name in labcli.sweep.__all__:
        assert getattr(fedclient.sweepcli, name) is getattr(labcli.sweep, name)


def _entry_points() -> list[object]:
    from dager.attack import iter_dager
    from dlg.attack import iter_dlg
    from dlg.text import iter_dlg_text

    return [iter_dager, iter_dlg, iter_dlg_text]


@pytest.mark.parametrize("entry", _entry_points(), ids=lambda f: f.__name__)
def test_attack_entry_points_take_only_model_update_and_config(entry: object) -> None:
    """Nothing derived from the private batch can be passed to an attack."""
    from fedclient.update import SharedUpdate

    params = list(inspect.signature(entry).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = [p for p in params if p.kind is p.KEYWORD_ONLY]
    assert [p.name for p in positional][1:] == ["update"], f"{entry.__name__}: {params}"
    assert positional[0].name in ("bundle", "model")
    assert [p.name for p in keyword] == ["config"], f"{entry.__name__} takes more than a config: {keyword}"
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
    hints = inspect.get_annotations(entry, eval_str=True)
    assert hints["update"] is SharedUpdate
