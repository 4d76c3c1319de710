"""The admin page (a later issue): views and commands on the model manager."""
