"""Beyond one machine: Spark standalone clusters (:mod:`.standalone`) and SLURM batch jobs
(:mod:`.slurm`); ``spark-mpi cluster ...`` and ``spark-mpi slurm ...``."""
