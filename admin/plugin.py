"""``AdminPlugin``: adds the admin page, its sign-in and its static files to the app."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.plugins import InitPluginProtocol
from litestar.static_files import create_static_files_router

from admin.controllers import AdminController, LoginController
from admin.rendering import HERE
from proxy.security import Access, requires


class AdminPlugin(InitPluginProtocol):
    def __init__(self) -> None:
        # Loads and unloads the page started, which outlive the request that asked for them.
        self.tasks: set[asyncio.Task[Any]] = set()

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers += [
            AdminController,
            LoginController,
            create_static_files_router(
                path="/admin/static", directories=[HERE / "static"], include_in_schema=False, opt=requires(Access.OPEN)
            ),
        ]
        tasks = self.tasks
        app_config.dependencies["admin_tasks"] = Provide(lambda: tasks, use_cache=True, sync_to_thread=False)
        return app_config
