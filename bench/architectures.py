"""The architecture matrix: lorakit against the real `peft` package on tiny random models of every listed family.

    python bench/architectures.py                 all architectures, a table, exit 1 if any fails
    python bench/architectures.py qwen3_moe gpt2  just these

For each architecture (2 layers, hidden 32, 4 experts on MoE models) and LoRA on all-linear:
  targets   lorakit's trainable count == PEFT's for the same targets (dense models: PEFT's own all-linear;
            MoE models: PEFT's all-linear minus the router LoRA lorakit leaves out, plus the dense-layer MLP
            PEFT's conversion leaves out on deepseek_v3 — checked through the config lorakit writes)
  peft->lk  a PEFT adapter with random non-zero A and B loads in lorakit: logits equal (1e-5)
  lk->peft  a lorakit adapter with random A and B loads in PEFT: logits equal (1e-5)
  step      one training step from the same factors: loss and every factor gradient equal (1e-5 / 1e-4)
  merge     merge_and_unload gives the adapted logits (1e-4) and no lorakit module
tests/model/test_architectures.py runs the same checks as parametrized tests.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, head_dim=8, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, num_labels=3)
MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
CAUSAL = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "qwen3_moe": MOE, "mixtral": MOE, "gemma": {},
    "gemma2": {}, "gemma3_text": {}, "phi": {}, "phi3": {}, "gpt2": {}, "gpt_neox": {}, "gptj": dict(rotary_dim=4),
    "falcon": dict(head_dim=None), "opt": dict(ffn_dim=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0, layerdrop=0.0), "bloom": {}, "starcoder2": {},
    "olmo2": {}, "granite": {}, "cohere": {}, "stablelm": {},
    "deepseek_v3": dict(MOE, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, num_key_value_heads=4,
                        head_dim=None, rope_scaling=None),
    "gpt_oss": dict(MOE, layer_types=["sliding_attention", "full_attention"]),
    "llama4_text": dict(MOE, interleave_moe_layer_step=1, intermediate_size_mlp=64),
    "smollm3": {}, "glm4": {}, "ernie4_5": {},
}
SEQ_CLS = {"bert": {}, "roberta": {}, "deberta-v2": {}, "modernbert": dict(cls_token_id=1, sep_token_id=2)}
ARCHITECTURES = list(CAUSAL) + [f"{k}-seqcls" for k in SEQ_CLS]
MOE_ARCHS = {"qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "llama4_text"}
R, ALPHA = 4, 8


def build(arch: str, seed: int = 0):
    """Returns a tiny random-init model of `arch` (eval mode, fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    seq = arch.endswith("-seqcls")
    model_type = arch[:-len("-seqcls")] if seq else arch
    kw = {**COMMON, **(SEQ_CLS if seq else CAUSAL)[model_type]}
    kw = {k: v for k, v in kw.items() if v is not None}
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if seq else AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def lorakit_config(arch: str, **kw):
    import lorakit
    extra = dict(task_type="SEQ_CLS", modules_to_save=["classifier"]) if arch.endswith("-seqcls") else {}
    return lorakit.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", **{**extra, **kw})


def _logits(model, ids):
    import torch
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_random(model, peft_cfg):
    # PEFT's init_lora_weights=False: A and B both random, so the adapter changes the output.
    import peft
    cfg = copy.deepcopy(peft_cfg)
    cfg.init_lora_weights = False
    return peft.get_peft_model(model, cfg)


def _peft_trainable(pm) -> int:
    return pm.get_nb_trainable_parameters()[0]


def _router_lora(pm) -> int:
    # LoRA params PEFT puts on MoE routers (lorakit never adapts a router unless named).
    from lorakit.model.targets import is_router
    n = 0
    for name, p in pm.named_parameters():
        if p.requires_grad and "lora_" in name:
            owner = name.split(".lora_")[0].replace("base_model.model.", "", 1)
            if is_router(owner, pm.get_submodule(name.split(".lora_")[0])):
                n += p.numel()
    return n


def check(arch: str) -> dict:
    """Runs every check on one architecture; returns {check name: error text or ''} plus 'seconds'."""
    import torch
    import peft
    import lorakit
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    res: dict = {}
    base = build(arch)
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    fresh = lambda: copy.deepcopy(base)

    def run(name, fn):
        try:
            fn()
            res[name] = ""
        except Exception as e:  # the table shows the first line of whatever failed
            res[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"

    tmp = tempfile.mkdtemp(prefix="lk-arch-")
    lk_dir, peft_dir = os.path.join(tmp, "lk"), os.path.join(tmp, "peft")
    state = {}

    def targets():
        lk = lorakit.inject(fresh(), lorakit_config(arch))
        lorakit.save_adapter(lk, lk_dir)
        exported = peft.LoraConfig.from_pretrained(lk_dir)
        exported.inference_mode = False
        state["peft_cfg"] = exported
        pm = peft.get_peft_model(fresh(), copy.deepcopy(exported))
        got, want = lorakit.trainable_parameters(lk)[0], _peft_trainable(pm)
        assert got == want, f"lorakit trains {got:,} parameters, PEFT {want:,} with the same targets"
        own = peft.get_peft_model(fresh(), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                           **({"task_type": "SEQ_CLS"} if arch.endswith("-seqcls") else {})))
        want_own = _peft_trainable(own) - _router_lora(own)
        if arch == "deepseek_v3":  # PEFT's v5 conversion drops the dense and shared-expert MLPs; lorakit keeps them
            want_own += sum(p.numel() for n, p in lk.named_parameters() if p.requires_grad and "lora_" in n
                            and n.split(".lora_")[0].rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj"))
        if arch == "llama4_text" or arch in ("gpt_oss",):  # PEFT's all-linear adapts no expert here; lorakit does
            want_own = None
        assert want_own is None or got == want_own, f"all-linear: lorakit {got:,}, PEFT {want_own:,}"
        res["trainable"] = got

    def peft_to_lk():
        pm = _peft_random(fresh(), state["peft_cfg"])
        want = _logits(pm, ids)
        pm.save_pretrained(peft_dir)
        lk = lorakit.load_adapter(fresh(), peft_dir)
        got = _logits(lk, ids)
        assert (want - _logits(base, ids)).abs().max() > 1e-3, "the adapter does not change the output"
        diff = (got - want).abs().max().item()
        assert diff <= 1e-5, f"logits differ by {diff:.2e}"
        state["lk"] = lk

    def lk_to_peft():
        lk = lorakit.inject(fresh(), lorakit_config(arch, init_lora_weights="none"))
        if arch.endswith("-seqcls"):
            with torch.no_grad():
                for n, p in lk.named_parameters():
                    if ".modules_to_save." in n:
                        p.add_(0.1)
        want = _logits(lk, ids)
        lorakit.save_adapter(lk, lk_dir + "2")
        pm = peft.PeftModel.from_pretrained(fresh(), lk_dir + "2")
        diff = (_logits(pm, ids) - want).abs().max().item()
        assert diff <= 1e-5, f"logits differ by {diff:.2e}"

    def step():
        lk = lorakit.load_adapter(fresh(), peft_dir, is_trainable=True)
        pm = peft.PeftModel.from_pretrained(fresh(), peft_dir, is_trainable=True)
        lk.train(), pm.train()
        for m in (*lk.modules(), *pm.modules()):  # the base models' own dropout would make the two runs differ
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        labels = ids if not arch.endswith("-seqcls") else torch.tensor([0, 2])
        l1 = lk(input_ids=ids, labels=labels).loss
        l2 = pm(input_ids=ids, labels=labels).loss
        l1.backward(), l2.backward()
        assert abs(l1.item() - l2.item()) <= 1e-5, f"loss {l1.item():.6f} vs PEFT {l2.item():.6f}"
        g1 = {n.replace(".default", ""): p.grad for n, p in lk.named_parameters() if p.requires_grad}
        g2 = {n.replace("base_model.model.", "", 1).replace(".default", ""): p.grad
              for n, p in pm.named_parameters() if p.requires_grad}
        assert set(g1) == set(g2), f"trainable sets differ: {sorted(set(g1) ^ set(g2))[:3]}"
        for n in g1:
            a, b = g1[n], g2[n]
            assert a is not None and b is not None, f"{n}: no gradient"
            err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
            assert err <= 1e-4, f"{n}: gradient differs (relative {err:.1e})"

    def merge():
        lk = state["lk"]
        want = _logits(lk, ids)
        plain = lorakit.merge_and_unload(lk)
        assert not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules()), "lorakit modules left"
        diff = (_logits(plain, ids) - want).abs().max().item()
        assert diff <= 1e-4, f"merged logits differ by {diff:.2e}"

    run("targets", targets)
    run("peft->lk", peft_to_lk if "peft_cfg" in state else _skipped)
    run("lk->peft", lk_to_peft)
    run("step", step if "lk" in state else _skipped)
    run("merge", merge if "lk" in state else _skipped)
    res["seconds"] = time.perf_counter() - t0
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def _skipped():
    raise RuntimeError("skipped: an earlier check failed")


CHECKS = ("targets", "peft->lk", "lk->peft", "step", "merge")


def main(argv=None) -> int:
    import torch
    torch.set_num_threads(1)
    archs = (argv if argv is not None else sys.argv[1:]) or ARCHITECTURES
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        print(f"unknown architecture(s): {', '.join(unknown)}; known: {', '.join(ARCHITECTURES)}")
        return 2
    t0 = time.perf_counter()
    print(f"{'architecture':<18} {'trainable':>9}  " + "  ".join(f"{c:<8}" for c in CHECKS) + "  seconds")
    failures = []
    for arch in archs:
        res = check(arch)
        marks = "  ".join(f"{'ok' if not res[c] else 'FAIL':<8}" for c in CHECKS)
        print(f"{arch:<18} {res.get('trainable', 0):>9,}  {marks}  {res['seconds']:.2f}", flush=True)
        failures += [(arch, c, res[c]) for c in CHECKS if res[c]]
    for arch, c, why in failures:
        print(f"  {arch} {c}: {why}")
    print(f"{len(archs)} architectures, {len({a for a, _, _ in failures})} failing, "
          f"{time.perf_counter() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    sys.exit(main())
