"""LoRA through peft: the policy trains a low-rank adapter on its frozen base weights (bf16 on
CUDA), and SDPO's teacher is a second adapter on the same base, so that the teacher costs an
adapter, not a model. The reference that the KL anchor and the drift measures compare against
is the bare base, the adapters switched off, as verl takes its reference in a LoRA run.

sdpo_cl.py meets a LoRA policy in two places only: frozen_copy() asks it for its own copy
(adapter_copy here), and ema_update_() moves a copy's parameters toward the weights the policy
trains, which are its adapter's. Everything else (rollouts, scores, the optimizer) runs the
policy as it runs any model. Departure: verl's LoRA teacher is a whole second model that carries
an adapter of its own (a second get_peft_model, its A drawn anew); here it starts as a copy of
the student's adapter, whose B is zero, so at the first stage it scores exactly as the base.
Like verl, the EMA moves the two factors A and B, not their product."""
from __future__ import annotations

import contextlib
import copy
import types
import warnings
from pathlib import Path

import torch

from sdpo_cl import seed_everything

STUDENT = "default"       # peft's name for a model's first adapter: here the one trained
ADAPTER_FILE = "adapter_model.safetensors"    # the names peft itself reads and writes
PEFT_MISSING = ("lora_rank > 0 needs the peft package, which is not installed: pip install peft "
                "(or leave lora_rank at 0, full fine-tuning)")


def require_peft():
    """The peft module, or one clear error that says how to get it."""
    try:
        import peft
    except ImportError:
        raise ImportError(PEFT_MISSING) from None
    return peft


def target_modules(cfg):
    """peft's target_modules: 'all-linear' (every linear layer but the output head: q, k, v, o,
    gate, up and down in a Llama or a Qwen) or the names in lora_target_modules."""
    names = [n.strip() for n in cfg.lora_target_modules.split(",") if n.strip()]
    return "all-linear" if names == ["all-linear"] else names


def target_problem(model, cfg) -> str | None:
    """What lora_target_modules names that `model` has no linear layer for, or None."""
    targets = target_modules(cfg)
    if targets == "all-linear":
        return None
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)} - {"lm_head"})
    missing = [t for t in targets if t not in linear]
    if targets and not missing:
        return None
    return (f"lora_target_modules={cfg.lora_target_modules!r}: allowed 'all-linear' or names of "
            f"the model's linear layers, comma-separated ({', '.join(linear)})")


def add_lora(model, cfg):
    """The policy as a LoRA adapter of rank lora_rank on `model`'s weights, which are frozen (and
    cast to bf16 on CUDA with cfg.bf16: the autocast computes in bf16 anyway). The adapter is
    fp32 (peft's default), its A drawn from a seed of its own, so a run starts from the same
    adapter however it got there; B starts at zero. verl's peft call: r, lora_alpha,
    target_modules, bias 'none', task CAUSAL_LM (fsdp_workers.py)."""
    peft = require_peft()
    model.requires_grad_(False)
    if cfg.bf16 and model.device.type == "cuda":
        model.to(torch.bfloat16)
    seed_everything(cfg.seed, "lora")
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                             lora_dropout=cfg.lora_dropout, target_modules=target_modules(cfg),
                             bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():   # peft 0.21 reads transformers' deprecated alias
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        policy = peft.get_peft_model(model, config)
    policy.adapter_copy = types.MethodType(adapter_copy, policy)
    return policy


def is_lora(model) -> bool:
    """A LoRA policy (add_lora) or one of its Adapters."""
    return isinstance(model, Adapter) or hasattr(model, "adapter_copy")


def adapter_copy(policy, role):
    """sdpo_cl.frozen_copy() of a LoRA policy. 'base': the bare base, its adapters off (the
    policy as a sequence starts it, where a fresh adapter adds zero). Any other role: the adapter
    of that name, made at the first call and overwritten at every later one (a teacher reset),
    holding a copy of the student's adapter, frozen."""
    if role == "base":
        if any(p.any() for n, p in policy.named_parameters() if f"lora_B.{STUDENT}." in n):
            raise ValueError("a LoRA policy's reference is its bare base: take it before the "
                             "adapter trains")
        return Adapter(policy, None)
    if role not in policy.peft_config:
        policy.add_adapter(role, copy.deepcopy(policy.peft_config[STUDENT]))
    view = Adapter(policy, role)
    with torch.no_grad():
        for t, s in zip(view.parameters(), Adapter(policy, STUDENT).parameters(), strict=True):
            t.data = s.detach().clone()     # the student's values and dtype
            t.requires_grad_(False)
    return view


class Adapter:
    """One adapter of a LoRA policy (None: none, the bare base), run as a model of its own,
    frozen and in eval mode: a call switches the policy to that adapter for its length. Its
    parameters are the adapter's alone: the EMA moves them and a checkpoint keeps them. Every
    other attribute (config, device, forward's signature) is the policy's."""

    training = False

    def __init__(self, policy, name):
        self.policy, self.name = policy, name

    def __getattr__(self, attr):
        if attr == "policy":                  # not set yet (a copy being made): no recursion
            raise AttributeError(attr)
        return getattr(self.policy, attr)

    @contextlib.contextmanager
    def active(self):
        """The policy in eval mode with this adapter on (or none), then as it was: the student's
        adapter on, and the only one trainable (peft's set_adapter moves requires_grad)."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            if self.name is None:
                with self.policy.disable_adapter():
                    yield
            else:
                self.policy.set_adapter(self.name)
                yield
        finally:
            self.policy.set_adapter(STUDENT)
            self.policy.train(was_training)

    def __call__(self, *args, **kwargs):
        with self.active():
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.active():
            return self.policy.generate(*args, **kwargs)

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def named_parameters(self):
        tag = f".{self.name}."
        return [(n, p) for n, p in self.policy.named_parameters()
                if self.name is not None and tag in n]

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def to(self, dtype):
        """The adapter's weights in `dtype` (teacher_bf16); the base is shared and stays."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self


def owner(model):
    """(the LoRA policy, the adapter's name) of a policy (its student) or an Adapter."""
    return (model.policy, model.name) if isinstance(model, Adapter) else (model, STUDENT)


@torch.no_grad()
def effective_weights(model):
    """(name, weight) of each parameter as the model computes with it, for the drift measures:
    named_parameters(), or for a LoRA policy or Adapter the base weights with the adapter's
    product added, W + (alpha / r) B A in fp32 (the bare base: W), the adapters left out."""
    if not is_lora(model):
        yield from model.named_parameters()
        return
    policy, name = owner(model)
    layers = {f"{n}.base_layer.weight": m for n, m in policy.named_modules()
              if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    for n, p in policy.named_parameters():
        if "lora_" in n:
            continue
        if n in layers and name is not None and name in layers[n].lora_A:
            yield n, p.float() + layers[n].get_delta_weight(name).float()
        else:
            yield n, p


def save_adapter(model, folder):
    """An adapter's weights and config in `folder` as peft writes them (adapter_model.safetensors,
    adapter_config.json): PeftModel.from_pretrained(base, folder) loads it."""
    from safetensors.torch import save_file
    peft = require_peft()
    policy, name = owner(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = peft.get_peft_model_state_dict(policy, adapter_name=name)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / ADAPTER_FILE))
    policy.peft_config[STUDENT].save_pretrained(str(folder))


def load_adapter(model, folder):
    """Weights written by save_adapter, loaded in place into the policy's student adapter or an
    Adapter; a file for another model or rank is refused."""
    from safetensors.torch import load_file
    peft = require_peft()
    policy, name = owner(model)
    state = load_file(str(Path(folder) / ADAPTER_FILE))
    expected = peft.get_peft_model_state_dict(policy, adapter_name=name)
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise ValueError(f"{folder} holds an adapter of another model or rank")
    with torch.no_grad():
        result = peft.set_peft_model_state_dict(policy, state, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{folder}: unexpected adapter weights {result.unexpected_keys[:3]}")
