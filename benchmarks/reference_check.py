"""Reference check: gradcouple's ROME and MEMIT against a step-for-step transcription of the reference
algorithms, on the same SmolLM2 edits, layers, covariance, context templates and hyperparameters.

The transcription follows the reference code's data flow, not gradcouple's: requests with a "{}"
prompt; whole strings tokenized with right padding; the lookup index from the token counts of the
text before the subject and of the subject (ROME's ``repr_tools.get_words_idxs_in_templates``);
output editing at traced modules (``nethook.TraceDict``); v_init recorded in the first forward;
the loss on the last len(target) positions; ROME's u = C⁻¹-or-not mean key, normalised, right
vector (v* − W k*) / (k*·u); MEMIT's z at the last edited block with the loss read through the
final norm and the LM head, keys averaged per template group, the float64 update
R Kᵀ(λC + KKᵀ)⁻¹ per block. Sources: kmeng01/rome at 0874014 (rome/rome_main.py, compute_u.py,
compute_v.py, repr_tools.py), kmeng01/memit (memit/memit_main.py, compute_z.py, compute_ks.py).

Usage:
    python benchmarks/reference_check.py --pieces data/science/rippleedits/pieces.jsonl --n-edits 20 \\
        --out docs/science.md

Writes the ``reference-check`` section of ``--out``: per method, both efficacies and the cosine of
the two weight changes, edit by edit summarised.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from sections import put


# ----------------------------------------------------------------------------- the transcription

class Trace:
    """nethook.TraceDict's part the reference uses: record modules' inputs/outputs, edit outputs."""

    def __init__(self, model, names, edit_output=None):
        self.modules = {n: model.get_submodule(n) for n in names}
        self.edit_output, self.inputs, self.outputs, self.handles = edit_output, {}, {}, []

    def __enter__(self):
        for name, m in self.modules.items():
            def hook(mod, args, out, name=name):
                self.inputs[name] = args[0]
                if self.edit_output is not None:
                    tup = out if isinstance(out, tuple) else (out,)  # transformers 5 blocks return a tensor
                    edited = self.edit_output(tup, name)
                    out = edited if isinstance(out, tuple) else edited[0]
                self.outputs[name] = out if isinstance(out, tuple) else (out,)
                return out
            self.handles.append(m.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def words_idxs_in_templates(tok, templates, words):
    """repr_tools.get_words_idxs_in_templates(subtoken='last'): prefix and word tokenized apart."""
    prefixes, out = [], []
    for tmpl, word in zip(templates, words):
        prefix = tmpl[: tmpl.index("{}")]
        if prefix:
            assert prefix[-1] == " ", f"the reference needs a space before the subject: {tmpl!r}"
            prefix, word = prefix[:-1], f" {word.strip()}"
        n_prefix = len(tok(prefix)["input_ids"]) if prefix else 0
        out.append(n_prefix + len(tok(word)["input_ids"]) - 1)
    return out


def reprs_at_word(model, tok, templates, words, module, track):
    """repr_tools.get_reprs_at_word_tokens: a module's input or output at each word's last token."""
    idxs = words_idxs_in_templates(tok, templates, words)
    batch = tok([t.format(w) for t, w in zip(templates, words)], return_tensors="pt", padding=True)
    with torch.no_grad(), Trace(model, [module]) as tr:
        model(**batch)
    x = tr.inputs[module] if track == "in" else tr.outputs[module][0]
    return torch.stack([x[i, idx] for i, idx in enumerate(idxs)])


def value(model, tok, request, hp, layer, templates, site, lm_head=None, ln_f=None):
    """compute_v / compute_z: v_init + delta at ``site`` (the MLP output for ROME, a block for MEMIT)."""
    target_ids = tok(request["target_new"]["str"])["input_ids"]
    rewriting = [t.format(request["prompt"]) + tok.decode(target_ids[:-1]) for t in templates]
    kl_prompts = ["{} is a"]
    all_prompts = rewriting + kl_prompts
    input_tok = tok([p.format(request["subject"]) for p in all_prompts], return_tensors="pt", padding=True)
    targets = torch.full((len(rewriting), input_tok["input_ids"].shape[1]), -100)
    for i in range(len(rewriting)):
        ex_len = int(input_tok["attention_mask"][i].sum())
        targets[i, ex_len - len(target_ids):ex_len] = torch.tensor(target_ids)
    lookup = words_idxs_in_templates(tok, all_prompts, [request["subject"]] * len(all_prompts))
    hidden = model.config.hidden_size
    delta = torch.zeros(hidden, requires_grad=True)
    state = {"init": None}

    def edit_output(out, name):
        if name == site:
            if state["init"] is None:
                state["init"] = out[0][0, lookup[0]].detach().clone()
            h = out[0].clone()
            for i, idx in enumerate(lookup):
                h[i, idx, :] = h[i, idx, :] + delta
            out = (h, *out[1:])
        return out

    opt = torch.optim.Adam([delta], lr=hp["v_lr"])
    kl_init = None
    loss_layer = f"model.layers.{max(hp['v_loss_layer'], layer)}"
    for it in range(hp["v_num_grad_steps"]):
        opt.zero_grad()
        with Trace(model, sorted({site, loss_layer}), edit_output) as tr:
            logits = model(**input_tok).logits
        kl_logits = torch.stack([logits[len(rewriting) + i, idx] for i, idx in enumerate(lookup[len(rewriting):])])
        kl_lp = torch.log_softmax(kl_logits, dim=1)
        if kl_init is None:
            kl_init = kl_lp.detach().clone()
        if lm_head is not None:  # MEMIT reads the loss through ln_f and the head at v_loss_layer
            logits = ln_f(tr.outputs[loss_layer][0][: len(rewriting)]) @ lm_head.t()
        log_probs = torch.log_softmax(logits[: len(rewriting)], dim=2)
        loss = torch.gather(log_probs, 2, torch.where(targets != -100, targets, 0).unsqueeze(2)).squeeze(2)
        mask = (targets != -100).float()
        nll = (-(loss * mask).sum(1) / len(target_ids)).mean()
        kl = hp["kl_factor"] * torch.nn.functional.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
        wd = hp["v_weight_decay"] * (torch.norm(delta) / torch.norm(state["init"]) ** 2)
        loss = nll + kl + wd
        if loss < 5e-2 or it == hp["v_num_grad_steps"] - 1:
            break
        loss.backward()
        opt.step()
        max_norm = hp["clamp_norm_factor"] * state["init"].norm()
        if delta.norm() > max_norm:
            with torch.no_grad():
                delta[...] = delta * max_norm / delta.norm()
    return (state["init"] + delta).detach()


def reference_rome(model, tok, request, hp, templates, cov):
    """rome_main.execute_rome for one layer: the weight change (d_out, d_in) float64, weights unchanged."""
    layer = hp["layers"][0]
    module = f"model.layers.{layer}.mlp.down_proj"
    with torch.no_grad():
        cur = reprs_at_word(model, tok, [t.format(request["prompt"]) for t in templates],
                            [request["subject"]] * len(templates), module, "in").mean(0)
    u = (torch.linalg.inv(cov.float()) @ cur) if hp["mom2_adjustment"] else cur
    u = u / u.norm()
    target = value(model, tok, request, hp, layer, templates, f"model.layers.{layer}.mlp")
    with torch.no_grad():
        k = reprs_at_word(model, tok, [request["prompt"]], [request["subject"]], module, "in")[0]
        wk = reprs_at_word(model, tok, [request["prompt"]], [request["subject"]], module, "out")[0]
    right = (target - wk) / torch.dot(k, u)
    return {module: torch.outer(right, u).double()}


def reference_memit(model, tok, requests, hp, template_groups, covs):
    """memit_main.execute_memit: the weight change per block, float64; weights restored afterwards."""
    flat = [t for g in template_groups for t in g]
    z_layer = hp["layers"][-1]
    zs = torch.stack([value(model, tok, r, hp, z_layer, flat, f"model.layers.{z_layer}", model.lm_head.weight,
                            model.model.norm) for r in requests], 1)
    deltas, saved = {}, {}
    for i, layer in enumerate(hp["layers"]):
        module = f"model.layers.{layer}.mlp.down_proj"
        W = model.get_submodule(module).weight
        saved[module] = W.detach().clone()
        with torch.no_grad():
            ks = reprs_at_word(model, tok, [t.format(r["prompt"]) for r in requests for g in template_groups for t in g],
                               [r["subject"] for r in requests for g in template_groups for _ in g], module, "in")
            bounds = np.cumsum([0] + [len(g) for g in template_groups]).tolist()
            per = len(flat)
            K = torch.stack([torch.stack([ks[j * per + a:j * per + b].mean(0) for a, b in zip(bounds, bounds[1:])]).mean(0)
                             for j in range(len(requests))]).t()
            cur = reprs_at_word(model, tok, [r["prompt"] for r in requests], [r["subject"] for r in requests],
                                f"model.layers.{z_layer}", "out").t()
        R = (zs - cur) / (len(hp["layers"]) - i)
        K, R = K.double(), R.double()
        adj = torch.linalg.solve(hp["mom2_update_weight"] * covs[layer].double() + K @ K.t(), K)
        upd = R @ adj.t()
        with torch.no_grad():
            W[...] = saved[module] + upd.float()
        deltas[module] = upd
    with torch.no_grad():
        for module, w in saved.items():
            model.get_submodule(module).weight[...] = w
    return deltas


# ----------------------------------------------------------------------------- the comparison

def main() -> None:
    from gradcouple.edits import EditContext, Rewrite, method_class
    from gradcouple.edits.templates import context_templates
    from gradcouple.keys import wikipedia_covariances
    from gradcouple.layers import select_targets
    from gradcouple.models import load_model
    from gradcouple.pieces import read_pieces
    from gradcouple.scoring import encode, measure_logprobs
    from gradcouple.stages.benchmark import benchmark_edits

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pieces", type=Path, required=True, help="RippleEdits pieces.jsonl (gradcouple download)")
    ap.add_argument("--n-edits", type=int, default=20)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="rome,memit")
    ap.add_argument("--out", type=Path, default=None, help="write the 'reference-check' section of this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    tok.padding_side = "right"
    pieces = read_pieces(args.pieces)
    edits = [e for e in benchmark_edits(pieces) if len(e.edits) == 1 and e.originals][: args.n_edits]
    targets = select_targets(model, "all")
    fingerprint = lm.identity().fingerprint
    rows, t_start = [], time.perf_counter()
    for name in args.methods.split(","):
        method = method_class(name).resolve(model=model)
        hp = method.settings()
        hp["v_loss_layer"] = hp["v_loss_layer"] if hp["v_loss_layer"] is not None else len(targets) - 1
        touched = [t for t in targets if t.block in hp["layers"]]
        covs = {t.block: C[:t.d_in, :t.d_in] for t, (C, _) in
                zip(touched, wikipedia_covariances(model, tok, touched, 50_000).values())}
        same_cov = {t.name: covs[t.block] for t in touched}  # the bias-free SmolLM2 projections: d_in' = d_in
        ctx = EditContext(model, targets, lm.pad_id, None, lambda t: same_cov[t.name], tokenizer=tok,
                          fingerprint=fingerprint, max_length=256)
        groups = context_templates(model, tok, fingerprint, hp["context_template_length_params"])
        flat = [q + "{}" for g in groups for q in g]
        cosines, ours_ok, ref_ok, counted, skipped = [], 0, 0, 0, 0
        for e in edits:
            p, o = pieces[e.edits[0]], pieces[e.originals[0]]
            subject = p.triple.subject
            at = p.prompt.rfind(subject)
            request = {"prompt": p.prompt[:at] + "{}" + p.prompt[at + len(subject):], "subject": subject,
                       "target_new": {"str": " " + p.answer.strip()}}
            enc_new, enc_true = encode(tok, p.prompt, " " + p.answer.strip()), encode(tok, o.prompt, " " + o.answer.strip())
            before = measure_logprobs(model, [enc_new, enc_true])
            if before[0] > before[1] or p.answer.strip().casefold() == o.answer.strip().casefold():
                continue  # already satisfied or the same target: efficacy does not count it
            try:
                if name == "rome":
                    ref = reference_rome(model, tok, request, hp, flat, covs[hp["layers"][0]])
                else:
                    ref = reference_memit(model, tok, [request], hp, [["{}"]] + [[q + "{}" for q in g] for g in groups[1:]],
                                          covs)
            except AssertionError:
                skipped += 1
                continue
            counted += 1
            w0 = {t.name: t.weight_matrix()[:, :t.d_in].double() for t in touched}
            ours = method.apply(ctx, [Rewrite(enc_new, subject=subject)])
            after = measure_logprobs(model, [enc_new, enc_true])
            ours_ok += bool(after[0] > after[1])
            for t in touched:
                t.module.weight.data.copy_(w0[t.name].float())
            a = torch.cat([ours[t.name][:, :t.d_in].double().flatten() for t in touched])
            b = torch.cat([ref[t.name].flatten() for t in touched])
            cosines.append(float(a @ b / (a.norm() * b.norm())))
            with torch.no_grad():
                for t in touched:
                    t.module.weight += ref[t.name].float()
            after = measure_logprobs(model, [enc_new, enc_true])
            ref_ok += bool(after[0] > after[1])
            for t in touched:
                t.module.weight.data.copy_(w0[t.name].float())
            print(f"{name} {subject!r} -> {p.answer!r}: cosine {cosines[-1]:.8f}", flush=True)
        rows.append((name, hp["layers"], counted, ours_ok, ref_ok, cosines, skipped))
    lines = ["| method | layers | edits counted | gradcouple efficacy | reference efficacy | cosine of ΔW, mean (min) "
             "| 1 − cosine, max |", "|---|---|---|---|---|---|---|"]
    for name, layers, n, ours, ref, cos, skipped in rows:
        lines.append(f"| {name} | {','.join(map(str, layers))} | {n}{f' ({skipped} the reference cannot parse)' if skipped else ''} "
                     f"| {ours}/{n} | {ref}/{n} | {np.mean(cos):.6f} ({min(cos):.6f}) | {1 - min(cos):.1e} |")
    n_threads = torch.get_num_threads()
    text = "\n".join(lines) + (f"\n\nWall time {time.perf_counter() - t_start:.0f} s on {n_threads} CPU "
                                f"thread{'s' if n_threads > 1 else ''}.")
    print(text)
    if args.out:
        put(args.out, "reference-check", text)


if __name__ == "__main__":
    main()
