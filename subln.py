"""
Stage 1 of BitNet Distillation (paper section 3.1): modeling refinement with SubLN, and the
conversion of a full-precision Qwen3 into a 1.58-bit BitNet.

    Eq. (4)  Y_l     = X_l + SubLN(Concat(heads)) W_out                      (SubLN before o_proj)
    Eq. (5)  X_{l+1} = Y_l + SubLN((Y_l W_up) ⊙ σ(Y_l W_gate)) W_down        (SubLN before down_proj)

Every q, k, v, o, gate, up, down projection becomes a BitLinear (Eq. 1-3, bitlinear.py). The
embeddings, the lm_head and every RMSNorm that was already there stay full precision (they are
counted as such wherever memory is reported). With subln=False (the ablation of Table 5) only
the linears change; with subln_all=True a SubLN also goes before q, k, v, gate and up (the
authors' released runs; the paper's text puts it only before o_proj and down_proj).

    from model import Qwen3
    from subln import convert_to_bitnet
    model = convert_to_bitnet(Qwen3.from_pretrained("Qwen/Qwen3-0.6B"), subln=True)
Loading any checkpoint (HF or ours, full precision or 1.58-bit): model.load_model.
"""
from bitlinear import BitLinear
from model import Qwen3, RMSNorm

LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "mlp": ("gate_proj", "up_proj", "down_proj")}


class SubLN(RMSNorm):
    """SubLN is an RMSNorm (weight initialised to 1) on the input of o_proj / down_proj.
    It rescales the hidden states before they are quantized to int8 (Eq. 3), which keeps their
    variance in range and stabilises training (paper section 3.1)."""


def convert_to_bitnet(model, subln=True, subln_all=False, weight_quant="absmean", quant_eps="add"):
    """In place: Qwen3 -> 1.58-bit BitNet. Returns the model. Latent weights are copied unchanged.
    subln: SubLN before o_proj and down_proj, Eq. (4)-(5). subln_all: also before q, k, v, gate and
    up (each its own, inside the BitLinear), as the authors' released runs do (their
    `standard_bitnet=False`; recipe item subln_at). weight_quant, quant_eps: Table 4's weight
    quantizer and the quantizers' ε form (bitlinear.py; recipe item quant_eps)."""
    c = model.config
    if c.bitnet:
        raise ValueError("model is already converted to BitNet")
    if subln_all and not subln:
        raise ValueError("SubLN before all seven projections needs SubLN (drop --no_subln or use --subln_at o_down)")
    bitnet_layers(model, subln, subln_all, weight_quant, quant_eps)
    c.bitnet, c.subln, c.subln_all, c.weight_quant, c.quant_eps = True, subln, subln_all, weight_quant, quant_eps
    return model


def bitnet_layers(model, subln, subln_all, weight_quant="absmean", quant_eps="add"):
    """The conversion itself: every projection a BitLinear, and the SubLNs."""
    c = model.config
    for block in model.model.layers:
        for part, names in LINEARS.items():
            mod = getattr(block, part)
            for name in names:
                setattr(mod, name, BitLinear.from_linear(getattr(mod, name), weight_quant, quant_eps))
                lin = getattr(mod, name)
                if subln_all and name not in ("o_proj", "down_proj"):   # input: the hidden state, width C
                    lin.in_norm = SubLN(c.hidden_size, c.rms_norm_eps).to(lin.weight)
        if subln:
            w = block.self_attn.o_proj.weight
            block.self_attn.subln = SubLN(c.num_attention_heads * c.head_dim, c.rms_norm_eps).to(w)  # Eq. (4)
            block.mlp.subln = SubLN(c.intermediate_size, c.rms_norm_eps).to(w)                     # Eq. (5)


def build_model(config):
    """An (untrained) model of `config`, with BitLinear and SubLN where config.bitnet / .subln /
    .subln_all say: the skeleton that one of our checkpoints' state dict loads into strictly."""
    model = Qwen3(config)                 # nn.Linear everywhere
    if config.bitnet:
        bitnet_layers(model, config.subln, config.subln_all, config.weight_quant, config.quant_eps)
    return model
