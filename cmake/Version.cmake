# The version that `mailflowd --version`, mailflow_build_info, the HTTP Server: header and the package carry.
# From a git checkout: PROJECT_VERSION+gitYYYYMMDD.HHMMSS.REV (the commit's UTC date and time and short hash,
# e.g. 0.1.0+git20261204.093015.abc1234; '+' sorts after the plain version in Debian's order, as a snapshot of
# it should, and a later commit after an earlier one, also on the same day: the hash alone sorts at random, and
# apt refuses a "downgrade"). From a tarball (no .git) or without git: PROJECT_VERSION. Computed at configure
# time; a commit re-runs the configure step (CMAKE_CONFIGURE_DEPENDS on HEAD and its ref), so a build never
# carries a stale revision (also in a `git worktree`). Uncommitted changes are not marked.
include_guard(GLOBAL)

set(MAILFLOW_VERSION_FULL ${PROJECT_VERSION})
if(EXISTS ${PROJECT_SOURCE_DIR}/.git)
  find_package(Git QUIET)
  if(Git_FOUND)
    execute_process(COMMAND ${GIT_EXECUTABLE} rev-parse --short=7 HEAD
                    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR} RESULT_VARIABLE rev_rc
                    OUTPUT_VARIABLE mailflow_git_rev OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    execute_process(COMMAND ${CMAKE_COMMAND} -E env TZ=UTC
                            ${GIT_EXECUTABLE} log -1 --format=%cd --date=format-local:%Y%m%d.%H%M%S
                    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR} RESULT_VARIABLE date_rc
                    OUTPUT_VARIABLE mailflow_git_date OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(rev_rc EQUAL 0 AND date_rc EQUAL 0 AND mailflow_git_rev MATCHES "^[0-9a-f]+$"
       AND mailflow_git_date MATCHES "^[0-9]+\\.[0-9]+$")
      set(MAILFLOW_VERSION_FULL "${PROJECT_VERSION}+git${mailflow_git_date}.${mailflow_git_rev}")
    endif()
    # Reconfigure when HEAD moves: HEAD itself (branch switch), the branch's ref (commit) and packed-refs.
    # In a `git worktree` HEAD is in the worktree's own git dir, the refs in the main repository's (common) one.
    execute_process(COMMAND ${GIT_EXECUTABLE} rev-parse --absolute-git-dir
                    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR} RESULT_VARIABLE dir_rc
                    OUTPUT_VARIABLE mailflow_git_dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    execute_process(COMMAND ${GIT_EXECUTABLE} rev-parse --path-format=absolute --git-common-dir
                    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR} RESULT_VARIABLE common_rc
                    OUTPUT_VARIABLE mailflow_git_common_dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(NOT common_rc EQUAL 0)
      set(mailflow_git_common_dir ${mailflow_git_dir})
    endif()
    execute_process(COMMAND ${GIT_EXECUTABLE} symbolic-ref -q HEAD
                    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}
                    OUTPUT_VARIABLE mailflow_git_ref OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(dir_rc EQUAL 0)
      foreach(f ${mailflow_git_dir}/HEAD ${mailflow_git_common_dir}/${mailflow_git_ref}
                ${mailflow_git_common_dir}/packed-refs)
        if(EXISTS ${f})
          set_property(DIRECTORY ${PROJECT_SOURCE_DIR} APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${f})
        endif()
      endforeach()
    endif()
  endif()
endif()
set(MAILFLOW_BUILD_TYPE "${CMAKE_BUILD_TYPE}")
if(NOT MAILFLOW_BUILD_TYPE)
  set(MAILFLOW_BUILD_TYPE "no build type")
endif()
message(STATUS "mailflowd version ${MAILFLOW_VERSION_FULL} (${MAILFLOW_BUILD_TYPE})")
