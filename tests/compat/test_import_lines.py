"""Every seed's import lines, with only the module switched, import; the README table names only tested modules."""

from __future__ import annotations

import os
import re

import pytest

# The import lines of each repository's training scripts / trainers (the names they take from their clustering,
# memory and association utilities), module path replaced by the compat module.
IMPORT_LINES = {
    "clustercontrast": ["from vireid_fast.compat.clustercontrast import ClusterMemory",
                        "from vireid_fast.compat.clustercontrast import compute_jaccard_distance"],
    "adca": ["from vireid_fast.compat.adca import ClusterMemory",
             "from vireid_fast.compat.adca import compute_jaccard_distance"],
    "pgm": ["from vireid_fast.compat.pgm import ClusterMemory",
            "from vireid_fast.compat.pgm import compute_jaccard_distance"],
    "pclhd": ["from vireid_fast.compat.pclhd import ClusterMemory",
              "from vireid_fast.compat.pclhd import compute_jaccard_distance, "
              "compute_modal_invariant_jaccard_distance"],
    "hil": ["from vireid_fast.compat.hil import ClusterMemory,Memory_wise_v3,ClusterMemory_shared",
            "from vireid_fast.compat.hil import compute_jaccard_distance,compute_ranked_list,compute_ranked_list_cm"],
    "mult": ["from vireid_fast.compat.mult import MULT, generate_one_hot_label",
             "from vireid_fast.compat.mult import ClusterMemory",
             "from vireid_fast.compat.mult import compute_jaccard_distance, rerank_jaccard"],
    "salcr": ["from vireid_fast.compat.salcr import part_ot, knn_graph, agg_feature",
              "from vireid_fast.compat.salcr import ClusterMemory, WeightedMemory",
              "from vireid_fast.compat.salcr import compute_jaccard_distance, rerank_jaccard"],
}


@pytest.mark.parametrize("repo", sorted(IMPORT_LINES))
def test_import_lines(repo):
    for line in IMPORT_LINES[repo]:
        exec(line, {})


def test_readme_table_lists_the_tested_modules():
    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    if not os.path.exists(readme):
        pytest.skip("README.md not found")
    with open(readme) as f:
        text = f.read()
    text = text[text.index("### Drop-in replacements"):]
    text = text[:text.index("\n### ", 5)]
    listed = set(re.findall(r"`vireid_fast\.compat\.(\w+)`", text))
    assert set(IMPORT_LINES) <= listed, f"README drop-in table misses {set(IMPORT_LINES) - listed}"
    assert listed <= set(IMPORT_LINES) | {"agw"}, f"README names untested modules {listed - set(IMPORT_LINES)}"
    for name in re.findall(r"^\| [^|]+ \| ([^|]+) \|", text, re.M):
        for ident in re.findall(r"`(\w+)`", name):
            if ident[0].isalpha() and ident not in ("memory", "cross_association"):
                assert any(ident in " ".join(lines) for lines in IMPORT_LINES.values()), ident
