"""The registry: clembench's entries read, validated and resolved (``entries``), and a registry file edited
(``file``)."""
