# Packaging: man pages (scdoc), the install layout of a Debian system, and `cpack -G DEB`.
# Included once from the top CMakeLists.txt. `make deb` runs cpack in the release tree (RelWithDebInfo,
# stripped in the package); tests/packaging/test_deb.sh checks a package built from whatever tree it runs in.
include_guard(GLOBAL)

# cpack installs what the package ships (mailflowd, man pages, files); it need not build the test suite first
# (`make deb` builds those targets). Without this, cpack's preinstall step builds every target of the tree.
set(CMAKE_SKIP_INSTALL_ALL_DEPENDENCY ON)

# System paths. Absolute on purpose: a system daemon's units, config and users live here whatever
# CMAKE_INSTALL_PREFIX is (the package installs with prefix /usr).
set(MAILFLOW_UNITDIR "/lib/systemd/system" CACHE PATH "systemd system unit directory")
set(MAILFLOW_SYSUSERSDIR "/usr/lib/sysusers.d" CACHE PATH "sysusers.d directory")
set(MAILFLOW_TMPFILESDIR "/usr/lib/tmpfiles.d" CACHE PATH "tmpfiles.d directory")
set(MAILFLOW_CONFDIR "/etc/mailflowd" CACHE PATH "configuration directory")
set(MAILFLOW_EXAMPLE_CONFIG "${PROJECT_SOURCE_DIR}/config/examples/mailflowd.yaml" CACHE FILEPATH
    "installed as ${MAILFLOW_CONFDIR}/mailflowd.yaml")

# --- man pages: docs/man/NAME.SECTION.scd -> NAME.SECTION.gz ----------------------------------
find_program(SCDOC_PROGRAM scdoc)
find_program(GZIP_PROGRAM gzip REQUIRED)
set(mailflow_man_pages mailflowd.8 mailflowd.yaml.5)
set(MAILFLOW_MAN_DIR ${PROJECT_BINARY_DIR}/man)
if(SCDOC_PROGRAM)
  set(mailflow_man_outputs)
  foreach(page IN LISTS mailflow_man_pages)
    string(REGEX REPLACE "^.*\\.([0-9])$" "\\1" section ${page})
    set(src ${PROJECT_SOURCE_DIR}/docs/man/${page}.scd)
    set(out ${MAILFLOW_MAN_DIR}/man${section}/${page})
    # Plain page for `man -l` and MANPATH (tests), gzipped copy for the package; -n: reproducible.
    add_custom_command(OUTPUT ${out} ${out}.gz
      COMMAND ${CMAKE_COMMAND} -E make_directory ${MAILFLOW_MAN_DIR}/man${section}
      COMMAND ${SCDOC_PROGRAM} < ${src} > ${out}
      COMMAND ${GZIP_PROGRAM} -9nf -k ${out}
      DEPENDS ${src}
      COMMENT "scdoc ${page}"
      VERBATIM)
    list(APPEND mailflow_man_outputs ${out} ${out}.gz)
    install(FILES ${out}.gz DESTINATION share/man/man${section})
  endforeach()
  add_custom_target(man ALL DEPENDS ${mailflow_man_outputs})
else()
  message(WARNING "scdoc not found: man pages are not built (deploy/dev/deps.sh build installs it)")
endif()

# --- install layout (the binary itself: daemon/CMakeLists.txt installs it to sbin) --------------
install(FILES ${PROJECT_SOURCE_DIR}/systemd/mailflowd.service ${PROJECT_SOURCE_DIR}/systemd/mailflowd.socket
        DESTINATION ${MAILFLOW_UNITDIR})
install(FILES ${PROJECT_SOURCE_DIR}/systemd/mailflowd.sysusers
        DESTINATION ${MAILFLOW_SYSUSERSDIR} RENAME mailflowd.conf)
install(FILES ${PROJECT_SOURCE_DIR}/systemd/mailflowd.tmpfiles
        DESTINATION ${MAILFLOW_TMPFILESDIR} RENAME mailflowd.conf)
install(FILES ${PROJECT_SOURCE_DIR}/systemd/socket-activation.conf DESTINATION share/mailflowd/systemd)
# The example config is written to pass --check-config without any certificate present. Never over a file that
# is there: `cmake --install` run again to upgrade from source keeps the administrator's configuration, as dpkg
# keeps the package's conffile (cpack installs into an empty DESTDIR, so the package always gets the example).
install(CODE "
  set(mailflow_config \"\$ENV{DESTDIR}${MAILFLOW_CONFDIR}/mailflowd.yaml\")
  if(EXISTS \"\${mailflow_config}\")
    message(STATUS \"Keeping: \${mailflow_config} (the example: ${MAILFLOW_EXAMPLE_CONFIG})\")
  else()
    file(INSTALL DESTINATION \"${MAILFLOW_CONFDIR}\" TYPE FILE RENAME mailflowd.yaml
         FILES \"${MAILFLOW_EXAMPLE_CONFIG}\")
  endif()")
# Globbed at install time: these folders fill up while the tree is configured.
install(DIRECTORY ${PROJECT_SOURCE_DIR}/deploy/prometheus/ DESTINATION share/mailflowd/prometheus
        FILES_MATCHING PATTERN "*.yml" PATTERN "*.yaml" PATTERN tests EXCLUDE)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/deploy/alertmanager/ DESTINATION share/mailflowd/alertmanager
        FILES_MATCHING PATTERN "*.yml" PATTERN "*.yaml" PATTERN tests EXCLUDE)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/deploy/grafana/ DESTINATION share/mailflowd/grafana
        FILES_MATCHING PATTERN "*.json")
install(DIRECTORY ${PROJECT_SOURCE_DIR}/docs/ DESTINATION share/doc/mailflowd
        FILES_MATCHING PATTERN "*.md" PATTERN "*.png" PATTERN "man" EXCLUDE)
# README.md links docs/X; in /usr/share/doc/mailflowd the docs sit beside it, so the links lose "docs/".
set(mailflow_doc_dir ${PROJECT_BINARY_DIR}/doc)
file(READ ${PROJECT_SOURCE_DIR}/README.md mailflow_readme)
string(REPLACE "](docs/" "](" mailflow_readme "${mailflow_readme}")
file(WRITE ${mailflow_doc_dir}/README.md "${mailflow_readme}")
set_property(DIRECTORY ${PROJECT_SOURCE_DIR} APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/README.md)
install(FILES ${mailflow_doc_dir}/README.md DESTINATION share/doc/mailflowd)
# Debian policy 12.5/12.7: a copyright file and a changelog (changelog.gz: the version has no Debian
# revision, so this is a native package). The changelog names the revision the package was built from.
configure_file(${CMAKE_CURRENT_LIST_DIR}/debian/copyright ${mailflow_doc_dir}/copyright COPYONLY)
if(DEFINED ENV{SOURCE_DATE_EPOCH})
  string(TIMESTAMP mailflow_changelog_date "%a, %d %b %Y %H:%M:%S +0000" UTC)
elseif(mailflow_git_rev)
  execute_process(COMMAND ${GIT_EXECUTABLE} log -1 --format=%cD WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}
                  OUTPUT_VARIABLE mailflow_changelog_date OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
endif()
if(NOT mailflow_changelog_date)
  string(TIMESTAMP mailflow_changelog_date "%a, %d %b %Y %H:%M:%S +0000" UTC)
endif()
if(mailflow_git_rev)
  set(mailflow_changelog_entry "Snapshot of git revision ${mailflow_git_rev}.")
else()
  set(mailflow_changelog_entry "Release ${PROJECT_VERSION}.")
endif()
file(WRITE ${mailflow_doc_dir}/changelog
"mailflowd (${MAILFLOW_VERSION_FULL}) unstable; urgency=medium

  * ${mailflow_changelog_entry} The project's history: its git log.

 -- mailflowd maintainers <mailflowd@example.org>  ${mailflow_changelog_date}
")
execute_process(COMMAND ${GZIP_PROGRAM} -9nf ${mailflow_doc_dir}/changelog)
install(FILES ${mailflow_doc_dir}/copyright ${mailflow_doc_dir}/changelog.gz DESTINATION share/doc/mailflowd)
# Lintian tags this package draws on purpose, each with its reason (cmake/debian/lintian-overrides).
install(FILES ${CMAKE_CURRENT_LIST_DIR}/debian/lintian-overrides DESTINATION share/lintian/overrides
        RENAME mailflowd)

# --- CPack: one Debian package --------------------------------------------------------------------
set(mailflow_deb_dir ${PROJECT_BINARY_DIR}/debian)
file(MAKE_DIRECTORY ${mailflow_deb_dir})
foreach(script postinst prerm postrm)
  configure_file(${CMAKE_CURRENT_LIST_DIR}/debian/${script} ${mailflow_deb_dir}/${script} @ONLY)
endforeach()
file(WRITE ${mailflow_deb_dir}/conffiles "${MAILFLOW_CONFDIR}/mailflowd.yaml\n")

set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME mailflowd)
set(CPACK_PACKAGE_VERSION ${MAILFLOW_VERSION_FULL})  # cmake/Version.cmake
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "${PROJECT_DESCRIPTION}")
set(CPACK_PACKAGE_CONTACT "mailflowd maintainers <mailflowd@example.org>")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION mail)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
# The synopsis line comes from CPACK_PACKAGE_DESCRIPTION_SUMMARY; this is the extended description only
# (cpack indents each line by one space).
set(CPACK_DEBIAN_PACKAGE_DESCRIPTION "mailflowd sits in front of a mail server, relays every SMTP connection
and records which TLS version protected each connection and message, per
connector. It exports Prometheus metrics, a connector report (JSON, CSV, HTML)
and alert rules for significant TLS1.0 and plaintext mail flow.")
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
# Alternatives as debhelper writes them for sysusers.d/tmpfiles.d users; shlibdeps are appended.
set(CPACK_DEBIAN_PACKAGE_DEPENDS
    "systemd | systemd-standalone-sysusers | systemd-sysusers, systemd | systemd-standalone-tmpfiles | systemd-tmpfiles")
# whois: mkpasswd, to make the http.basic_auth password hash.
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "man-db, whois")
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "prometheus, prometheus-alertmanager, grafana")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
    ${mailflow_deb_dir}/postinst ${mailflow_deb_dir}/prerm ${mailflow_deb_dir}/postrm ${mailflow_deb_dir}/conffiles)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
set(CPACK_DEBIAN_COMPRESSION_TYPE xz)
# As Debian ships binaries; the build tree keeps the symbols for debugging (no -dbgsym package is made).
set(CPACK_STRIP_FILES ON)
include(CPack)
