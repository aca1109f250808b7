"""Pieces shared by the lab's command lines (``dager``, ``dlg``, their ``sweep``/``text`` modes).

Torch-free on purpose: a CLI imports this before it has validated its arguments, so a
bad argument is answered in well under a second (issue 13), before any heavy library
loads. It is a top-level package rather than part of :mod:`fedclient` because argument
parsing, output files and signal handling belong to the faces, not to the simulated
client (issue 12).

* :mod:`labcli.common`: what both CLIs share: the usage error and parser, the
  ``--defense`` option and its JSON keys, the CUDA check, writing the result JSON.
* :mod:`labcli.outputs`: check output paths before any work, write results privately
  (mode 0600) and keep them when the chosen path fails at the end.
* :mod:`labcli.runtime`: argument types, SIGTERM as an interrupt, exit codes.
* :mod:`labcli.sweep`: the defense-sweep options and table of both CLIs (formerly
  ``fedclient.sweepcli``, which still resolves its names).
* :mod:`labcli.sweepfiles`: sweep rows to a CSV and a plotly plot (formerly in
  :mod:`fedclient.sweep`, which still resolves the names).
"""
