"""deer-flow's own tests of the public Sandbox API, run unedited against our provider.

``tests/test_local_sandbox_virtual_path_contract.py`` in deer-flow says it pins down "the public
Sandbox API boundary ... uniformly across implementations". Its tests take a ``provider``; those
that use only the public API are handed ours. Left out, and why: the ones that check
LocalSandbox's ids (``local:<user>:<thread>``), caches or private attributes, or expect
``read_file`` of a missing file to raise FileNotFoundError (deer-flow's AIO sandbox, which ours
follows, answers ``Error: ...`` instead).
"""

from __future__ import annotations

import pytest
import test_local_sandbox_virtual_path_contract as contract  # deer-flow's own (backend/tests)
from deerflow.sandbox.sandbox_provider import get_sandbox_provider

PUBLIC_API_TESTS = [
    contract.test_write_then_read_via_public_api_with_virtual_path,
    contract.test_list_dir_via_public_api_with_virtual_path,
    contract.test_execute_command_with_virtual_path,
    contract.test_glob_with_virtual_path,
    contract.test_grep_with_virtual_path,
    contract.test_execute_command_lists_aggregate_user_data_root,
    contract.test_list_dir_on_user_data_root_does_not_duplicate_subdir_mounts,
    contract.test_update_file_with_virtual_path_for_remote_sync_scenario,
    contract.test_two_threads_get_distinct_sandboxes,
    contract.test_get_returns_cached_instance_for_known_id,
    contract.test_get_unknown_id_returns_none,
]


@pytest.mark.parametrize("deerflow_test", PUBLIC_API_TESTS, ids=lambda test: test.__name__)
def test_deer_flow_s_public_sandbox_api_tests_pass_on_our_provider(deerflow, deerflow_test):
    deerflow_test(get_sandbox_provider())
