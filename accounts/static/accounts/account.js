// The account pages: the "Copy" button next to a new API key.
// Falls back to selecting the text where the clipboard API is missing
// (plain-HTTP origins other than localhost), so the user copies by hand.

for (const button of document.querySelectorAll("button[data-copy]")) {
  const field = document.getElementById(button.dataset.copy);
  const status = document.getElementById("copy-status");
  if (!field) continue;
  field.addEventListener("focus", () => field.select());
  button.addEventListener("click", async () => {
    field.focus();
    field.select();
    let copied = false;
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(field.value);
        copied = true;
      }
    } catch {
      copied = false;
    }
    if (status) {
      status.textContent = copied
        ? "Copied to the clipboard."
        : "Selected: press Ctrl+C (⌘C on a Mac) to copy.";
    }
  });
}
