"""Applications built on the runner: tomography (:mod:`sparkmpi.apps.tomo`). Apps call
:func:`sparkmpi.run_mpi`; they never speak PMI."""
