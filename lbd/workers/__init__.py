"""Several proxy processes on one host: a supervisor and its workers (`lbd start --workers N`)."""
