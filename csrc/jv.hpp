#pragma once
// placeholder, replaced by the solver
