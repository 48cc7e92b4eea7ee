"""`ft.load_model(..., backend="transformers")` on the CPU, in the
environment with torch and transformers that scripts/test-vllm.sh makes
(skipped in the SDK's numpy-only suite, which collects this folder too):
the model it returns computes what transformers' own `from_pretrained`
does, for a plain and a compressed store model, and building it leaves
out the imports no model build needs (scikit-learn, scipy.optimize).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
def test_load_model_computes_what_from_pretrained_does(ft, daemon, synth_qwen3, compress):
    r = ft.register_model(str(synth_qwen3), backend="transformers", compress=compress)
    assert r["status"] == "registered"
    assert bool(ft.get_model_info(r["model_id"]).get("compressed")) == compress

    model, tokenizer = ft.load_model(r["model_id"], backend="transformers", device_map="cpu")
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(synth_qwen3))
    assert type(model) is type(reference)
    assert tokenizer is not None
    ours = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        assert ours[name].dtype == p.dtype, name
        assert torch.equal(ours[name], p), f"{name} differs from from_pretrained's"
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


# Runs in a fresh interpreter: whether a module was imported is a property
# of the process. A stand-in scikit-learn (on PYTHONPATH) records its import.
FRESH = textwrap.dedent(r"""
    import json, sys
    import torch, transformers
    import flashtensors as ft
    ft.configure(storage_path=sys.argv[1], mem_pool_size=64 << 20, use_gpu=False)
    r = ft.register_model(sys.argv[2], backend="transformers")
    ft.load_model(r["model_id"], backend="transformers", device_map="cpu")
    after_load = {m: m in sys.modules for m in ("sklearn", "sklearn.metrics")}
    from transformers.generation import candidate_generator
    called = candidate_generator.roc_curve([1, 0], [0.9, 0.2])
    import sklearn.metrics
    print(json.dumps({"after_load": after_load, "called": called,
                      "after_call": "sklearn" in sys.modules,
                      "real_module": sklearn.metrics.__file__,
                      "other_name": sklearn.metrics.f1_score(1, 2)}))
    ft.shutdown_server(storage_path=sys.argv[1])
""")


def test_model_build_defers_scikit_learn_until_called(ft, synth_qwen3, tmp_path):
    fake = tmp_path / "site" / "sklearn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os\nopen(os.environ['SKLEARN_MARK'], 'a').write('x')\n")
    (fake / "metrics.py").write_text(
        "def roc_curve(y, s):\n    return ['roc', len(y)]\n"
        "def f1_score(a, b):\n    return 0.5\n")
    mark = tmp_path / "imported"
    env = dict(os.environ, SKLEARN_MARK=str(mark),
               PYTHONPATH=os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "store"), str(synth_qwen3)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    # transformers saw scikit-learn installed, imported its roc_curve, and
    # got a function that imports the real module when called.
    assert out["after_load"] == {"sklearn": False, "sklearn.metrics": False}
    assert out["called"] == ["roc", 2]
    assert out["after_call"] and mark.read_text() == "x"
    # Afterwards the module is the real one, every name of it.
    assert out["real_module"] == str(fake / "metrics.py")
    assert out["other_name"] == 0.5
