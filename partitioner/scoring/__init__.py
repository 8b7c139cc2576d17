"""The resumable scoring job (scored folder, local and Ray executors)."""
