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
    return (f"loaded on {r['device']} ({r['dtype']}) in {r['load_seconds']:.1f} s; specialists: {kinds}; "
            f"composed layers {layer_ranges(r['composed_layers'])}; resident: {parts}{note}")
