"""What the notebooks compute: one builder per paper table or figure and the sentence that says what
it shows (generated from the numbers, with paired tests), plus the notebook helpers. Notebooks and
widgets call `afs_kit.studies`; `afs_kit.reports` only runs the notebooks with papermill.

- `common`: the run a notebook works on, cached evaluations, a table row's numbers, seeds.
- `tables`: tables 1-6.
- `figures`: figs. 3, 4 and 6 (the others are drawn from the tables' rows).
"""
from ..run.rundir import default_run_dir
from .common import (PGD_ATTACKS, TRUST_COLUMNS, accuracy_row, afs_name, baseline_budget, ci_text, colours,
                     evaluate_afs, evaluate_extractor, evaluation_flags, extractor_points, extractor_table, figures_dir,
                     health_label, label, main_alpha, main_subset, merger_exists, open_run, over_seeds, paired_sentence,
                     say, seed_runs, seeds_summary, show, stacked_labels, table)
from .figures import (delta_z_values, selection_rows, selection_summary, selection_text, tsne_rows, tsne_study,
                      tsne_summary, tsne_text, weight_rows, weight_study, weights_text)
from .tables import (alpha_sweep, alpha_text, attack_gains, best_single, comparison_table, comparison_text, cost_table,
                     cost_text, extractor_text, frontier_markers, frontier_points, paired_comparisons, paper_reference,
                     pgd_robust_flags, quoted, robustness_curves, singles_frontier, subset_points, subset_table,
                     subset_text)

__all__ = [
    "PGD_ATTACKS", "TRUST_COLUMNS", "accuracy_row", "afs_name", "baseline_budget", "ci_text", "colours",
    "default_run_dir",
    "evaluate_afs",
    "evaluate_extractor", "evaluation_flags", "figures_dir", "health_label", "label", "main_alpha", "main_subset",
    "merger_exists", "open_run", "over_seeds", "paired_sentence", "say", "seed_runs", "seeds_summary", "show",
    "table", "delta_z_values", "selection_rows", "selection_summary", "selection_text", "tsne_rows", "tsne_study",
    "tsne_summary", "tsne_text", "weight_rows", "weight_study", "weights_text", "alpha_sweep", "alpha_text",
    "attack_gains", "best_single", "comparison_table", "comparison_text", "cost_table", "cost_text",
    "extractor_points",
    "extractor_table", "extractor_text", "frontier_markers", "frontier_points", "paired_comparisons", "paper_reference",
    "pgd_robust_flags", "quoted", "robustness_curves", "singles_frontier", "stacked_labels", "subset_points",
    "subset_table", "subset_text",
]
