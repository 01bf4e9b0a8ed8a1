// Light, dark, or as the system says: the choice is kept in localStorage and
// set as <html data-theme> by this blocking script in <head>, before the page
// is painted, so a page never flashes the other theme. CSS keys its colours
// on [data-theme] (and on prefers-color-scheme when there is none).
// Any button with [data-theme-toggle] cycles system → light → dark.
(function () {
  "use strict";
  var KEY = "llmsite-theme";
  var ORDER = ["system", "light", "dark"];
  var LABELS = { system: "System", light: "Light", dark: "Dark" };
  var ICONS = { system: "◐", light: "☀", dark: "☾" };
  var root = document.documentElement;

  function stored() {
    try {
      var value = window.localStorage.getItem(KEY);
      return ORDER.indexOf(value) > 0 ? value : "system";
    } catch (error) {
      return "system"; // Storage refused (privacy settings): follow the system.
    }
  }

  function apply(theme) {
    if (theme === "system") root.removeAttribute("data-theme");
    else root.setAttribute("data-theme", theme);
    // Stylesheets made for one scheme (code highlighting) follow the choice.
    var sheets = document.querySelectorAll("link[data-scheme]");
    for (var i = 0; i < sheets.length; i++) {
      var scheme = sheets[i].getAttribute("data-scheme");
      sheets[i].media =
        theme === "system" ? "(prefers-color-scheme: " + scheme + ")" : theme === scheme ? "all" : "not all";
    }
    var buttons = document.querySelectorAll("[data-theme-toggle]");
    for (var j = 0; j < buttons.length; j++) {
      buttons[j].textContent = ICONS[theme] + " " + LABELS[theme];
      buttons[j].setAttribute("aria-label", "Theme: " + LABELS[theme] + " (change)");
      buttons[j].dataset.theme = theme;
    }
  }

  var current = stored();

  function choose(theme) {
    current = theme;
    try {
      if (theme === "system") window.localStorage.removeItem(KEY);
      else window.localStorage.setItem(KEY, theme);
    } catch (error) {
      // Not kept across pages, but applied to this one.
    }
    apply(theme);
  }

  apply(current);
  document.addEventListener("DOMContentLoaded", function () {
    apply(current);
    document.addEventListener("click", function (event) {
      var button = event.target.closest && event.target.closest("[data-theme-toggle]");
      if (!button) return;
      choose(ORDER[(ORDER.indexOf(current) + 1) % ORDER.length]);
    });
  });
  // Another tab changed it: follow.
  window.addEventListener("storage", function (event) {
    if (event.key === KEY) apply((current = stored()));
  });
})();
