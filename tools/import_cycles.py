"""Count import cycles inside mos_ext (module level and function level alike, as grimp reads them).

    python tools/import_cycles.py      # prints every strongly connected group and the elementary cycles; exit 1 if any

An import of a package counts as an import of its ``__init__``; ``from . import x`` inside ``mos_ext`` is
an import of ``mos_ext.x`` (grimp resolves it), and an import of a name re-exported by the facade is an
import of ``mos_ext``.
"""
import itertools
import sys

import grimp


def main() -> int:
    graph = grimp.build_graph("mos_ext", include_external_packages=False)
    mods = sorted(graph.modules)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & set(mods) for m in mods}
    # grimp cannot see the compiled mos_ext._C, so `from . import _C` reads as an import of the package:
    # such an edge is redirected to a leaf `mos_ext._C` (it imports nothing of ours)
    for m in mods:
        if "mos_ext" in edges[m]:
            lines = [d["line_contents"] for d in graph.get_import_details(importer=m, imported="mos_ext")]
            if lines and all(l.replace(" ", "") in ("from.import_C", "frommos_extimport_C") or
                             l.startswith("from . import _C") for l in lines):
                edges[m].discard("mos_ext")
                edges[m].add("mos_ext._C")
    mods.append("mos_ext._C")
    edges["mos_ext._C"] = set()
    cycles = []
    for a in mods:  # elementary cycles via simple DFS (the graph is small)
        stack = [(a, [a])]
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == a:
                    cycles.append(path)
                elif nxt > a and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    for c in cycles:
        print("cycle:", " -> ".join(c + [c[0]]))
    print(f"{len(mods)} modules, {sum(len(v) for v in edges.values())} internal import edges, {len(cycles)} cycles")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
