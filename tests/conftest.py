import fnmatch
import re

import jax
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


# The default suite's budget is six minutes on an idle 2-core machine. These tests (node-id
# patterns under `tests/`, `*` a wildcard) take the longest there and each has a quicker sibling
# that checks the same property by default: the MLP member of the zoo beside the convex ones,
# one checkpointing variant of several, the experiments' resume tests beside `test_harness`'s
# and ridge_l2's, multi-process and multi-device runs beside `test_shard_map_implicit`. They
# are marked `slow` and run with `nox -s slow`.
SLOW_FOR_THE_DEFAULT_BUDGET = [
    "test_benchmarks_peers.py::test_checkpointing_lowers_xla_peak_memory",
    "test_benchmarks_peers.py::test_forward_and_reverse_agree",
    "test_benchmarks_peers.py::test_task_batching_vmap_equals_loop",
    "test_benchmarks_peers.py::test_unrolled_contenders_agree_with_a_plain_loop",
    "test_cg.py::test_hypergradient_on_the_zoo[logistic-reverse]",
    "test_cg.py::test_hypergradient_on_the_zoo[ridge-reverse]",
    "test_custom_root.py::test_derivative_wrt_data_and_closure",
    "test_custom_root.py::test_fixed_point_non_symmetric*",
    "test_custom_root.py::test_hessian_through_the_wrapper",
    "test_custom_root.py::test_jaxopt_custom_root_oracle",
    "test_custom_root.py::test_ridge_any_solver[closed_form-False]",
    "test_delta_stn.py::test_dropout_regression_within_two_percent_of_closed_form",
    "test_delta_stn.py::test_response_jacobian_check_against_finite_differences[stn]",
    "test_delta_stn.py::test_resume_continues_a_killed_run",
    "test_delta_stn.py::test_resume_with_more_seeds_or_other_methods",
    "test_delta_stn.py::test_ridge_lands_on_the_closed_form_optimum",
    "test_delta_stn_jacobian.py::test_the_learned_jacobian_approaches_its_secant*",
    "test_delta_stn_step.py::test_delta_stn_skips_the_products_that_are_zero",
    "test_distributed.py::*",
    "test_effect_of_t.py::test_f_T_approaches_f",
    "test_effect_of_t.py::test_reverse_forward_checkpointed_agree",
    "test_effect_of_t.py::test_train_resumes_from_its_last_checkpoint",
    "test_failures.py::test_nonfinite_data[*-hoag-*]",
    "test_failures.py::test_one_nan_task_in_a_batch_poisons_the_meta_gradient",
    "test_hoag.py::test_a_truncated_linear_solve_raises_or_is_reported",
    "test_hoag.py::test_adaptive_tolerance_reaches_the_same_hparams_with_fewer_inner_steps[logistic]",
    "test_hoag.py::test_warm_starts_save_iterations_and_keep_the_hypergradients",
    "test_hyper_cleaning.py::test_implicit_hypergrad_matches_finite_differences",
    "test_hyper_cleaning.py::test_resume_runs_only_the_steps_left",
    "test_hyper_cleaning.py::test_unrolled_hypergrad_matches_finite_differences",
    "test_hyper_representation.py::test_batch_norm_uses_the_episode_statistics",
    "test_hyper_representation.py::test_convnet_shapes",
    "test_hyper_representation.py::test_implicit_head_in_the_episode_loss",
    "test_hyper_representation.py::test_meta_gradient_matches_finite_differences",
    "test_hyper_representation.py::test_meta_gradient_matches_hand_written_loop",
    "test_hyper_representation.py::test_meta_step_is_adam_on_the_meta_gradient",
    "test_hyper_representation.py::test_meta_step_sharded_over_4_devices",
    "test_hyper_representation.py::test_protonet_episode_loss_against_a_hand_computation",
    "test_hyper_representation.py::test_training_resumes_where_it_was_killed",
    "test_hypergrad_info.py::test_error_estimate_and_bound_track_the_inner_error",
    "test_hypergrad_info.py::test_error_estimate_and_bound_track_the_linear_solve_error",
    "test_hypergrad_info.py::test_info_reports_what_it_says",
    "test_implicit.py::test_adjoint_tolerance_follows_the_inner_solve",
    "test_implicit.py::test_grad_jvp_hessian_through_inner_solve[quadratic]",
    "test_implicit.py::test_grad_jvp_hessian_through_inner_solve[ridge]",
    "test_implicit.py::test_implicit_hypergrad_matches_reference[forward-logistic]",
    "test_implicit.py::test_implicit_hypergrad_matches_reference[reverse-logistic]",
    "test_implicit.py::test_mlp_hypergradient_against_dense_reference",
    "test_implicit.py::test_unconverged_linear_solve_raises_or_returns_its_approximation[forward]",
    "test_inner_solve.py::test_optimistix_loss_and_gradient_are_*[BFGS]",
    "test_inner_solve.py::test_optimistix_loss_and_gradient_are_*[GradientDescent]",
    "test_inner_solve.py::test_optimistix_loss_and_gradient_are_*[NonlinearCG]",
    "test_inner_solve.py::test_problem_zoo_reference_solutions_are_minimisers[mlp]",
    "test_inner_solve.py::test_solution_matches_reference[gd-logistic]",
    "test_inner_solve.py::test_solution_matches_reference[gd-momentum-logistic]",
    "test_inner_solve.py::test_solution_matches_reference[optax-sgd-logistic]",
    "test_lasso_ho.py::test_coming_from_jaxopt_programs_agree",
    "test_lasso_ho.py::test_hypergradient_descent_resumes_where_it_was_killed",
    "test_meta_ho.py::test_resume_runs_only_the_meta_steps_left",
    "test_nested.py::test_trilevel_hessian_forward_over_forward[implicit-implicit]",
    "test_nested.py::test_trilevel_hypergradient[implicit-*]",
    "test_nested.py::test_trilevel_hypergradient[unrolled-implicit]",
    "test_nested.py::test_trilevel_hypergradient[unrolled-unrolled]",
    "test_nested.py::test_trilevel_vmap_over_hparams",
    "test_nn.py::test_delta_stn_weight_gradients_are_decoupled",
    "test_nn.py::test_hypergradient_matches_finite_differences[centred]",
    "test_nn.py::test_hypergradient_matches_finite_differences[stn]",
    "test_nn.py::test_variants_agree_with_a_plain_network_at_init[centred]",
    "test_nn.py::test_variants_agree_with_a_plain_network_at_init[delta]",
    "test_nn.py::test_variants_agree_with_a_plain_network_at_init[stn]",
    "test_precision.py::test_ridge_low_precision_inner_loop[bfloat16]",
    "test_precision.py::test_ridge_low_precision_inner_loop[float32]",
    "test_preconditioner.py::test_indefinite_hessian_breaks_bx_cg_down",
    "test_preconditioner.py::test_indefinite_hessian_is_reported_and_gmres_solves_it",
    "test_preconditioner.py::test_indefinite_hessian_outranks_a_non_stationary_point",
    "test_preconditioner.py::test_user_preconditioner_exact_inverse_needs_one_step",
    "test_readme.py::test_getting_started_page_runs_and_its_claims_hold",
    "test_ridge_l2.py::test_demo_twice_writes_two_runs",
    "test_ridge_l2.py::test_resume_after_kill_runs_only_the_rest",
    "test_sharded_params.py::*",
    "test_sharding.py::*",
    "test_solver_state.py::test_resumed_lbfgs_solve_uses_its_curvature_pairs_*",
    "test_solver_state.py::test_solvers_without_curvature_start_afresh[gd]",
    "test_solver_state.py::test_the_quasi_newton_preconditioner_gives_the_same_*[bfgs]",
    "test_solver_state.py::test_the_quasi_newton_preconditioner_gives_the_same_*[lbfgs]",
    "test_stochastic.py::test_a_nonfinite_run_is_nan_and_says_so_per_task[saba]",
    "test_stochastic.py::test_a_run_in_pieces_equals_one_run[solver1]",
    "test_stochastic.py::test_full_batch_directions_are_the_implicit_hypergradient_at_the_fixed_points",
    "test_stochastic.py::test_saba_converges_with_constant_steps_where_soba_stalls",
    "test_stochastic.py::test_saba_memory_mean_stays_the_table_mean",
    "test_stochastic.py::test_soba_with_decreasing_steps_converges",
    "test_stochastic_bilevel.py::test_outputs_and_resume",
    "test_stochastic_bilevel.py::test_resume_after_kill_runs_only_the_rest",
    "test_stochastic_bilevel.py::test_resume_of_a_finished_run_runs_nothing",
    "test_stochastic_bilevel.py::test_stochastic_methods_lower_the_validation_loss",
    "test_unrolled.py::test_forward_mode_with_more_hyperparameters_than_one_chunk",
    "test_unrolled.py::test_matches_hand_written_loop[*-mlp]",
    "test_unrolled.py::test_matches_hand_written_loop[checkpoints*-logistic]",
    "test_unrolled.py::test_matches_hand_written_loop[checkpoints*-quadratic]",
    "test_unrolled.py::test_matches_hand_written_loop[forward-logistic]",
    "test_unrolled.py::test_matches_hand_written_loop[truncate=T-logistic]",
    "test_unrolled.py::test_unrolled_adjoint_in_inner_solve[logistic]",
    "test_unrolled.py::test_unrolled_converges_to_implicit[logistic]",
    "test_valid_models.py::test_inner_solve_with_an_unpenalised_bias[hessian]",
]


def _pattern(glob: str) -> str:
    # fnmatch reads `[...]` as a character class; here brackets are pytest's parameter ids.
    escaped = glob.replace("[", "\0").replace("]", "[]]").replace("\0", "[[]")
    return fnmatch.translate(escaped)


_SLOW = re.compile("|".join(_pattern("tests/" + glob) for glob in SLOW_FOR_THE_DEFAULT_BUDGET))


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if _SLOW.fullmatch(item.nodeid):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _restore_precision():
    # Experiments that train in float32 switch `jax_enable_x64` off for the whole process;
    # every test starts from the suite's float64, whatever ran before it.
    yield
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
