"""The composition root: builds every resource in one AsyncExitStack and runs the appliance."""
