import json
import subprocess
import sys

from conftest import REPO_ROOT


def run_plot(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "plot_metrics.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_plots_loss_curve_png(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for it in range(1, 41):
            f.write(json.dumps({"iteration": it, "lm_loss": 10 / it, "lr": 1e-3}) + "\n")
            if it % 10 == 0:
                f.write(json.dumps({"iteration": it, "valid_loss": 11 / it}) + "\n")
    result = run_plot(tmp_path)
    assert result.returncode == 0, result.stderr
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(tmp_path / "loss.png") as img:
        assert img.size == (800, 600)
        # a curve was drawn: the image is not a blank canvas
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 10
    assert "lm_loss, valid_loss" in result.stdout


def test_bad_metrics_name_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "lm_loss": 2.0}\n{oops\n')
    result = run_plot(tmp_path / "metrics.jsonl")
    assert result.returncode == 2
    assert "metrics.jsonl:2" in result.stderr and "Traceback" not in result.stderr
    missing = run_plot(tmp_path / "nothing")
    assert missing.returncode == 2 and "no such metrics file" in missing.stderr
