"""Each side installs and works alone: the runtime package imports neither torch, fairseq nor onnx even where they are
installed (torch-free by construction, not by blocking), and the fairseq plugin's evaluation and export import
nothing that only the runtime extra installs (onnxruntime, soxr)."""
import json
import sys

from conftest import ROOT, run

# onnx too: the runtime edits graphs with protobuf alone (fairseq_quant_runtime.onnx_proto); `import onnx` took
# 0.6-1.2 s of every decoding process
FRAMEWORKS = ("torch", "torchaudio", "fairseq", "fairseq_quant", "onnx")
RUNTIME_ONLY = ("onnxruntime", "soxr")


def test_every_runtime_module_imports_without_torch_or_fairseq_in_the_full_environment():
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import fairseq_quant_runtime as pkg\n"
        "names = [m.name for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.')]\n"
        "for name in names: importlib.import_module(name)\n"
        f"loaded = sorted({{k.split('.')[0] for k in sys.modules}} & set({FRAMEWORKS!r}))\n"
        "print(json.dumps({'modules': names, 'frameworks': loaded}))\n"
    )
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"fairseq_quant_runtime.__main__", "fairseq_quant_runtime.recognizer", "fairseq_quant_runtime.audio",
            "fairseq_quant_runtime.fqm", "fairseq_quant_runtime.ctc"} <= set(result["modules"])
    assert result["frameworks"] == []  # torch, fairseq and onnx are installed here: nothing imported them
    help_text = run([sys.executable, "-m", "fairseq_quant_runtime", "--help"])
    assert help_text.returncode == 0 and "usage: python -m fairseq_quant_runtime" in help_text.stdout


def test_the_plugin_evaluates_and_exports_without_the_runtime_extra(dict_dir, tmp_path):
    """The train extra alone (runtime-only packages made unimportable): the plugin registers with fairseq, its
    evaluation and export import, and a tiny quantized model exports to a readable .fqm."""
    block = "".join(f"sys.modules[{name!r}] = None; " for name in RUNTIME_ONLY)
    out = tmp_path / "tiny.fqm"
    code = (
        f"import sys; {block}\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import torch, fairseq_quant, fairseq_quant.evaluate, fairseq_quant.calibration, fairseq_quant.search\n"
        "from fairseq_quant.export.exporter import build_model_file, decode_only_spm\n"
        "from fairseq_quant_runtime import fqm\n"
        "from conftest import build_tiny, calibrate_tiny\n"
        f"task, model, _ = build_tiny(__import__('pathlib').Path({str(dict_dir)!r}), "
        "extra=['--quant-weight-bits', '4', '--quant-act-bits', '8'])\n"
        "calibrate_tiny(model, seeds=(0,))\n"
        "d = task.target_dictionary\n"
        "special = {'eos': d.eos(), 'pad': d.pad(), 'unk': d.unk(), 'bos': d.bos()}\n"
        f"spm = decode_only_spm(__import__('pathlib').Path({str(ROOT / 'recipes/librispeech/reference/spm.model')!r}))\n"
        "file, summary = build_model_file(model.eval(), list(d.symbols), spm, special, {}, {})\n"
        f"fqm.write({str(out)!r}, file)\n"
        f"print(len(summary['quantized']), sorted(set(summary['quantized'].values())))\n"
        f"assert not ({{k.split('.')[0] for k, v in sys.modules.items() if v is not None}} & set({RUNTIME_ONLY!r}))\n"
    )
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "40 [4]"
    from fairseq_quant_runtime import fqm

    assert fqm.read(out).config["model"] == "vggtransformer"
