"""The toy world plugs in: product modules never import diffalign.toy, and its pieces (like a user's) arrive through
the public registries (rewards, captioners, prompt scorers), by entry point or registered in code."""

from __future__ import annotations

import ast
import re
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import diffalign.plugins as plugins
from data_tools import caption
from data_tools.cli import main as data_main
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from diffalign.eval import scoring
from diffalign.eval.folders import ImageFolder
from diffalign.eval.report import summary_dict, write_report_md
from diffalign.rewards import registry

ROOT = Path(__file__).resolve().parents[1]
# the toy front-end commands of diffalign/cli.py (demo, evidence, toy): the only product code allowed to import it
CLI_TOY_COMMANDS = {"_demo", "_evidence", "_toy"}
# a module path given as a string, imported later ("diffalign.toy.rewards:ToyGoldReward", import_module("..."))
TOY_PATH = re.compile(r"diffalign\.toy(\.\w+)*(:\w+)?")


def _is_toy(module: str) -> bool:
    return module == "diffalign.toy" or module.startswith("diffalign.toy.")


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*parts, *([node.module] if node.module else [])])


def toy_references(source: str, package: str, allowed_functions: set[str] = frozenset()) -> list[str]:
    """``"line: what"`` for every import of diffalign.toy in ``source`` (a module of ``package``) outside the
    functions named ``allowed_functions``: ``import``, ``from ... import`` (relative too) and module-path strings."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in allowed_functions:
            return
        if isinstance(node, ast.Import):
            found.extend(f"{node.lineno}: import {a.name}" for a in node.names if _is_toy(a.name))
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, package)
            names = [a.name for a in node.names]
            if _is_toy(module) or (module == "diffalign" and "toy" in names):
                found.append(f"{node.lineno}: from {module} import {', '.join(names)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and TOY_PATH.fullmatch(node.value):
            found.append(f"{node.lineno}: string {node.value!r}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def product_modules() -> list[Path]:
    files = [*sorted((ROOT / "diffalign").rglob("*.py")), *sorted((ROOT / "data_tools").rglob("*.py"))]
    return [f for f in files if (ROOT / "diffalign" / "toy") not in f.parents]


def test_product_modules_do_not_import_the_toy_world() -> None:
    modules = product_modules()
    assert len(modules) > 40 and ROOT / "diffalign" / "eval" / "scoring.py" in modules
    offences = []
    for path in modules:
        rel = path.relative_to(ROOT)
        package = ".".join(rel.with_suffix("").parts[:-1])
        allowed = CLI_TOY_COMMANDS if rel == Path("diffalign/cli.py") else set()
        offences += [f"{rel}:{hit}" for hit in toy_references(path.read_text(encoding="utf-8"), package, allowed)]
    assert not offences, "product modules import diffalign.toy (register through diffalign/toy/plugin.py):\n" + (
        "\n".join(offences)
    )


def test_the_scanner_catches_every_form_and_spares_the_toy_commands() -> None:
    source = '''
"""Docs may mention diffalign.toy.metrics in prose."""
import diffalign.toy.world
from diffalign.toy import metrics
from diffalign import toy
from . import toy as t2
from .toy.rewards import shape_boxes
TABLE = {"r": "diffalign.toy.rewards:ToyGoldReward"}
def _demo():
    from diffalign.toy.demo import run_demo
def other():
    import importlib
    importlib.import_module("diffalign.toy.llm_evidence")
'''
    hits = toy_references(source, "diffalign", {"_demo"})
    assert [h.split(":")[0] for h in hits] == ["3", "4", "5", "6", "7", "8", "13"], hits
    assert toy_references("import diffalign.toys\nx = 'see diffalign.toy.metrics'\n", "diffalign") == []


@pytest.fixture
def clean_registries():
    """Registries and the plugin-loaded flag restored after the test."""
    saved = (dict(registry.REWARDS), dict(caption.CAPTIONERS), dict(scoring.PROMPT_SCORERS), plugins._loaded)
    yield
    for live, old in zip((registry.REWARDS, caption.CAPTIONERS, scoring.PROMPT_SCORERS), saved, strict=False):
        live.clear()
        live.update(old)
    plugins._loaded = saved[3]


class ConstantReward:
    differentiable = False

    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.full((len(prompts),), self.value)


def test_a_reward_registered_in_code_is_found_by_name(clean_registries) -> None:
    images = torch.zeros(3, 3, 8, 8)
    registry.register_reward("my_constant", ConstantReward)
    registry.register_reward("my_constant", ConstantReward)  # the same builder again: a no-op
    assert registry.build_reward({"name": "my_constant", "value": 2.5})(images, ["a"] * 3).tolist() == [2.5] * 3
    rewards = scoring.build_eval_rewards(["my_constant"], {"my_constant": {"value": -1.0}})
    assert rewards["my_constant"](images, ["a"] * 3).tolist() == [-1.0] * 3
    assert "my_constant" in registry.reward_names()
    with pytest.raises(ValueError, match="'my_constant' is already registered"):
        registry.register_reward("my_constant", lambda: ConstantReward(3.0))
    registry.register_reward("my_constant", lambda: ConstantReward(3.0), replace=True)
    assert registry.build_reward("my_constant")(images, ["a"]).tolist() == [3.0]
    with pytest.raises(ValueError, match="without ':'"):
        registry.register_reward("pkg:thing", ConstantReward)
    with pytest.raises(TypeError, match="callable or 'module:attribute'"):
        registry.register_reward("my_other", "not_a_path")


class EchoCaptioner:
    def __init__(self, template: str, **_options) -> None:
        self.template = template

    def __call__(self, images, prompts) -> list[str]:
        texts = [self.template.replace("{prompt}", p) for p in prompts]
        return [f"{img.size[0]}px {text}" for img, text in zip(images, texts, strict=True)]


def test_a_captioner_registered_in_code_runs_the_caption_command(clean_registries, tmp_path: Path, capsys) -> None:
    caption.register_captioner("echo", EchoCaptioner)
    src = write_pickapic_parquet(tmp_path / "in.parquet", make_random_pairs(3))
    out = tmp_path / "out.parquet"
    args = ["caption", str(src), str(out), "--model", "echo", "--template", "of {prompt}"]
    assert data_main(args) == 0, capsys.readouterr().err
    rows = pq.read_table(out).to_pylist()
    assert [r["caption_0"] for r in rows] == [f"16px of {r['caption']}" for r in rows]
    assert [r["caption_1"] for r in rows] == [r["caption_0"] for r in rows]
    with pytest.raises(ValueError, match="'echo' is already registered"):
        caption.register_captioner("echo", lambda **kw: EchoCaptioner("x"))


def _folder(prompts: list[str], images: torch.Tensor) -> ImageFolder:
    counts: dict[str, int] = {}
    entries = []
    for i, p in enumerate(prompts):
        entries.append({"prompt": p, "prompt_index": sorted(set(prompts)).index(p), "sample_index": counts.get(p, 0),
                        "file": f"{i}.png"})  # fmt: skip
        counts[p] = counts.get(p, 0) + 1
    return ImageFolder(Path("mem"), entries, images)


def test_a_prompt_scorer_registered_in_code_adds_its_metrics(clean_registries, tmp_path: Path) -> None:
    scorer = scoring.PromptScorer(
        name="zz",
        claims=lambda prompts, images: all(p.startswith("zz") for p in prompts),
        group_metrics=lambda images, prompts: {"zz_max": float(images.max())},
        summary=lambda images, prompts: {"zz_images": float(len(prompts))},
        title="ZZ metrics",
        default_rewards=("my_constant",),
    )
    scoring.register_prompt_scorer(scorer)
    assert scoring.get_prompt_scorer("zz") is scorer
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.1, 0.3, 0.6, 0.2)])
    result = scoring.score_folder(_folder(["zz b", "zz a", "zz b", "zz a"], images), {})
    by_prompt = {row["prompt"]: row["zz_max"] for row in result.per_prompt}
    assert by_prompt == pytest.approx({"zz a": 0.3, "zz b": 0.6})
    assert result.diversity["zz_max"] == pytest.approx(0.45) and result.extra["zz"] == {"zz_images": 4.0}
    assert summary_dict({"A": result}, None, {})["models"]["A"]["zz"] == {"zz_images": 4.0}
    report = write_report_md({"A": result}, None, {"rewards": []}, [], tmp_path / "report.md", [])
    assert "## ZZ metrics" in report.read_text()
    other = scoring.score_folder(_folder(["plain", "plain"], images[:2]), {})
    assert other.extra["zz"] is None and "zz_max" not in other.diversity
    from diffalign.eval.evaluation import default_rewards

    assert "my_constant" in default_rewards(_folder(["zz a", "zz a"], images[:2]))
    with pytest.raises(ValueError, match="summary.json key"):
        scoring.register_prompt_scorer(scoring.PromptScorer(name="scores", claims=lambda p, i: False))


def test_the_toy_names_resolve_through_the_entry_point(clean_registries) -> None:
    points = {p.name: p.value for p in entry_points(group=plugins.ENTRY_POINT_GROUP)}
    assert points.get("toy") == "diffalign.toy.plugin:register", "reinstall: pip install -e . --no-deps"
    for name in ("toy_gold", "toy_reward_model"):
        registry.REWARDS.pop(name, None)
    caption.CAPTIONERS.pop("toy", None)
    scoring.PROMPT_SCORERS.pop("toy", None)
    plugins._loaded = None
    assert "toy_gold" not in registry.REWARDS  # not a built-in: the plugin brings it
    gold = registry.build_reward("toy_gold")
    assert "toy" in plugins.load_plugins() and registry.REWARDS["toy_reward_model"] == (
        "diffalign.toy.rewards:load_toy_reward_model"
    )
    from diffalign.toy.world import ShapeSpec, render_batch

    red = render_batch([ShapeSpec("red", "circle", 8.0, 8.0, 8.0, 0.5)])
    assert gold(red, ["a red circle"]).tolist() == [1.0] and gold(red, ["a blue circle"]).tolist() == [0.5]
    assert scoring.get_prompt_scorer("toy").default_rewards == ("toy_gold",)
    assert type(caption.build_captioner("toy", template="x")).__name__ == "ToyCaptioner"
    from diffalign.toy.plugin import register

    register()  # a second registration of the same pieces is a no-op, not a "name taken" error


def test_a_broken_plugin_is_skipped_with_a_warning(clean_registries, monkeypatch) -> None:
    class Broken:
        name, value = "broken", "nowhere:register"

        def load(self):
            raise ImportError("No module named 'nowhere'")

    monkeypatch.setattr(plugins, "entry_points", lambda group: [Broken()])
    plugins._loaded = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plugins.load_plugins() == []
    assert any("'broken' (nowhere:register) failed to load" in str(w.message) for w in caught)
    assert plugins.load_plugins() == []  # once per process: no second warning
