"""Text reports of a compiled model: the structure table `hierdsl compile` prints."""

from __future__ import annotations

from hierdsl.compiler.builtins import fmt_shape

_ROLE_ORDER = ("global", "global_det", "local", "input", "site_det", "observation")
_ROLE_TITLE = {
    "global": "global", "global_det": "global (det.)", "local": "local", "input": "input",
    "site_det": "site (det.)", "observation": "observation",
}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def structure_table(model) -> str:
    """Every global, local, input, observation and deterministic value with shape, support and prior."""
    ir = model.ir
    title = f"model {ir.name}" + (f"  ({model.path})" if model.path else "")
    args = ", ".join(f"{k} = {v}" for k, v in ir.args)
    out = [title, f"  arguments: {args or 'none'}",
           f"  sites: {ir.site_index} in 1:{ir.num_sites}", f"  hash: {ir.hash[:16]}", ""]
    rows = []
    for role in _ROLE_ORDER:
        for v in ir.by_role(role):
            rhs = model.definitions.get(v.name, "")
            rows.append([
                _ROLE_TITLE[role], v.name, fmt_shape(v.shape), v.dtype,
                v.support.describe() if v.stochastic else "—",
                ("~ " if v.stochastic else "= ") + rhs,
            ])
    out.extend(_table(["role", "name", "shape", "dtype", "support", "definition"], rows))
    glob, per_site = ir.global_tokens, ir.tokens_per_site
    out.append("")
    out.append(
        f"tokens: {glob} global, {per_site} per site "
        f"({ir.num_sites} sites → {glob + per_site * ir.num_sites} in all)"
    )
    if ir.functions or ir.externs:
        names = [f.id for f in ir.functions] + [f"{x.id} (extern{' host' if x.host else ''})" for x in ir.externs]
        out.append("functions: " + ", ".join(names))
    return "\n".join(out)
