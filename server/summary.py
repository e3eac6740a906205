"""What a loaded constellation holds, in one line: printed by ``constellation serve`` and ``explain``.

Here rather than in the CLI so that the server's modules need nothing from ``server.cli`` (the
console entry point sits at the top of the import graph).
"""

from __future__ import annotations


def layer_ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8``."""
    out, start = [], None
    for k, i in enumerate(layers):
        if start is None:
            start = i
        if k + 1 == len(layers) or layers[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def load_summary(loaded) -> str:
    """One line on what is resident: the generalist, and per specialist only what it changes."""
    r = loaded.report
    parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in r["resident_bytes"].items())
    kinds = ", ".join(f"{d} {k}" + (f" r={r['adapter_ranks'][d]}" if d in r["adapter_ranks"] else "")
                      for d, k in r["specialist_kinds"].items())
    exact = [d for d, ok in r["trunk_exact"].items() if not ok]
    note = (f"; specialists differing outside the composed layers (signature=trunk approximates): {exact}"
            if exact else "")
    cal = loaded.constellation.settings.calibrated
    weighting = describe_weighting(cal.weighting, cal.sharpness_for(cal.weighting), cal.strength,
                                   bands=cal.bands_for(cal.weighting))
    held = ((loaded.manifest or {}).get("calibration") or {}).get("held_out_loss")
    if held:  # why this one: index build chose it
        weighting += " (chosen at index build: the lowest held-out loss, " + ", ".join(
            f"{n} {v:.4f}" for n, v in sorted(held.items(), key=lambda kv: kv[1])) + ")"
    w = r.get("weights") or {"format": "bf16"}
    weights = ("" if w["format"] == "bf16" else f", generalist's matrices {w['format']}"
               + (f" in groups of {w['group']}" if w.get("group") else "") + ", embedding and head int8")
    return (f"loaded on {r['device']} ({r['dtype']}{weights}) in {r['load_seconds']:.1f} s; specialists: {kinds}; "
            f"composed layers {layer_ranges(r['composed_layers'])}; {weighting}; resident: {parts}{note}")


def engine_summary(loaded, limits) -> str:
    """The engine's memory and limits: the KV cache (positions, bytes), the longest sequence and prompt
    (with the options that change them) and prepacked weights."""
    g = loaded.constellation.g
    mc = g.mc
    per = mc.n_layers * 2 * mc.n_kv_heads * mc.head_dim * g.dtype.itemsize
    limits = limits.for_model(g)
    kv = limits.kv_tokens
    packed = (f"; prepacked matrices (oneDNN) {g.packed_bytes / 2**20:.1f} MiB" if g.packed
              else "; matrices not prepacked")
    return (f"KV cache: {kv} positions ({kv * per / 2**30:.2f} GiB, --kv-cache-tokens), sequences up to "
            f"{limits.max_seq_len} tokens (--max-seq-len; the model's context: {mc.max_positions}), prompts up to "
            f"{limits.max_prompt_tokens} (--max-prompt-tokens), max_tokens up to {limits.max_new_tokens} "
            f"(--max-new-tokens), up to {limits.max_running} rows per step, admitted while their KV fits{packed}")


def describe_weighting(name: str, sharpness: float | None, strength: dict[str, float] | None,
                       profile: dict | None = None, bands=None) -> str:
    """``weighting softmax (temperature 0.15), strength legal 1.5, code 0.7``: what a composition uses;
    an adaptive weighting with its bands (``bands``), or with the profile value a prompt had and the
    temperature it got (``profile``, as ``/explain`` reports it)."""
    from composer.weightings import WEIGHTINGS

    w = WEIGHTINGS[name]
    if profile:
        how = f" (its {profile['name']} {profile['value']:.3f}: temperature {profile['temperature']:g}; {profile['bands']})"
    elif w.profile is not None and bands is not None:
        how = f" ({bands.describe(w.profile_name)})"
    else:
        how = "" if sharpness is None or w.sharpness is None else f" ({w.sharpness} {sharpness:g})"
    return f"weighting {name}{how}" + (", strength " + ", ".join(f"{d} {g:g}" for d, g in strength.items())
                                      if strength else "")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:g}"


def calibration_lines(cal: dict | None, detail: bool = False, domains: list[str] | None = None) -> list[str]:
    """What ``index build`` calibrated (docs/weightings.md), for ``index build`` and ``index inspect``;
    ``domains``: the index's specialists now (strengths in their order; a note if the calibration was
    measured on another catalog)."""
    if not cal:
        return ["calibration: none (built with [index].calibrate = false): the paper's rule, strength 1"]
    if "skipped" in cal:
        return [f"calibration: skipped ({cal['skipped']}): the paper's rule, strength 1"]
    from composer.weightings import WEIGHTINGS, Bands

    items = cal["items"]
    w = cal["weighting"]
    refs = cal["reference_loss"]
    s = cal["sharpness"].get(w)
    bands = cal.get("bands", {}).get(w)
    measured = cal.get("domains")
    order = [d for d in (domains or measured or []) if d in cal["strength"]] or list(cal["strength"])
    other = (f"; measured on the catalog of {', '.join(measured)}, before a catalog change"
             if measured and domains and list(measured) != list(domains) else "")
    lines = [
        f"calibration on held-out index probes ({cal['folds']} folds: {items['single']} probes, "
        f"{items['control']} controls, {items.get('mixed', 0)} mixed probes, {items['pair']} joined pairs; "
        f"{cal['seconds']:.0f} s{other}):",
        f"  default weighting {w}" + (f", {WEIGHTINGS[w].sharpness} {_fmt(s)}" if s is not None else "")
        + (f", {Bands.of(bands).describe(WEIGHTINGS[w].profile_name)}" if bands else "")
        + f"; mean loss {cal['loss'][w]['all']:.4f} (paper's rule {refs['paper']['all']:.4f}, "
        f"router {refs['routed']['all']:.4f}, generalist {refs['generalist']['all']:.4f})",
        *([f"  chosen by {cal['chosen_by']}"] if cal.get("chosen_by") else []),
        "  strength: " + ", ".join(f"{d} {cal['strength'][d]:g}" for d in order)
        + (f"  (uncalibrated since a catalog change: {', '.join(cal['uncalibrated'])}; rebuild the index to "
           "recalibrate)" if cal.get("uncalibrated") else ""),
    ]
    if detail:
        for name, b in cal.get("bands", {}).items():
            if name != w:
                lines.append(f"  {name}: {Bands.of(b).describe(WEIGHTINGS[name].profile_name)}")
        if cal.get("held_out_loss"):
            lines.append("  held-out loss: " + ", ".join(f"{n} {v:.4f}" for n, v in cal["held_out_loss"].items()))
        if cal.get("profile"):
            lines.append("  second alpha (min, quartiles, max): " + "; ".join(
                f"{k} " + " ".join(f"{v:g}" for v in q) for k, q in cal["profile"].items() if q))
        for name, curve in cal.get("sharpness_curves", {}).items():
            lines.append(f"  {name} {WEIGHTINGS[name].sharpness}: "
                         + ", ".join(f"{k} {v:.4f}" for k, v in curve.items()))
        for d, curve in (cal.get("strength_curves") or {}).items():
            lines.append(f"  strength {d}: " + ", ".join(f"{k} {v:.4f}" for k, v in curve.items()))
    return lines
