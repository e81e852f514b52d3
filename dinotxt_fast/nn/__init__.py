"""Drop-in torch modules backed by dinotxt-fast's ops."""
