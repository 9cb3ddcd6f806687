"""The edge never imports torch, nor the trainer or exporter: checked in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# torch must be installed in the test environment for this check to mean anything.
HEAVY = ("torch", "torchvision", "onnx", "onnxscript", "sklearn")

_REPORT = textwrap.dedent("""
    import json, sys
    def loaded(prefixes):
        return sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in prefixes))
    report = {"heavy": loaded(HEAVY), "train": loaded(["ganspect.train"]), "export": loaded(["ganspect.export"])}
""")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_torch_is_installed_here_so_the_check_can_fail():
    proc = _python("import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)")
    assert proc.returncode == 0, "torch is not installed: the no-torch tests below would prove nothing"


def test_every_edge_module_and_the_scorer_run_without_torch(tiny_bundle, make_part_image, tmp_path):
    frame_path = tmp_path / "part.png"
    import cv2

    assert cv2.imwrite(str(frame_path), make_part_image(True, 1))
    code = (
        textwrap.dedent(f"""
        import importlib, pkgutil
        import cv2
        import ganspect.edge
        names = [m.name for m in pkgutil.iter_modules(ganspect.edge.__path__, "ganspect.edge.")
                 if m.name != "ganspect.edge.__main__"]  # __main__ would run the CLI
        for name in names:
            importlib.import_module(name)
        from ganspect.edge.config import InspectionConfig
        from ganspect.edge.inspector import Inspector
        from ganspect.edge.scorer import Scorer
        scorer = Scorer.load({str(tiny_bundle)!r})
        result = Inspector(InspectionConfig()).inspect(cv2.imread({str(frame_path)!r}), scorer, scorer.threshold).score
        HEAVY = {HEAVY!r}
    """)
        + _REPORT
        + "report['modules'] = names; report['result'] = result.result; print(json.dumps(report))"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "ganspect.edge.app" in report["modules"] and "ganspect.edge.scorer" in report["modules"]
    assert report["result"] == "NG"
    assert report["heavy"] == []
    assert report["train"] == [] and report["export"] == []


def test_the_daemon_through_the_cli_runs_without_torch(tiny_bundle, tiny_video, make_edge_config, tmp_path):
    # The real command path: entry points, config, bundle, OpenCV source, scoring, verdicts.
    config = make_edge_config(tiny_bundle, tiny_video.path, None)
    verdicts = tmp_path / "v.jsonl"
    code = (
        textwrap.dedent(f"""
        import sys
        from ganspect.edge.cli import main
        rc = main(["edge", "--config", {str(config)!r}, "--headless", "--verdict-log", {str(verdicts)!r}])
        HEAVY = {HEAVY!r}
    """)
        + _REPORT
        + "report['rc'] = rc; print(json.dumps(report))"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    assert len(verdicts.read_text(encoding="utf-8").splitlines()) == len(tiny_video.expected)
    assert report["heavy"] == []
    # The CLI loads every sub-command's entry point to build its parser; those modules
    # (ganspect.train.commands, ganspect.export.commands) must stay light, and nothing
    # else of the trainer or the exporter may be loaded.
    assert set(report["train"]) <= {"ganspect.train", "ganspect.train.commands"}, report["train"]
    assert set(report["export"]) <= {"ganspect.export", "ganspect.export.commands"}, report["export"]
