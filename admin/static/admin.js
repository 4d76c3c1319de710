// Filters the rows as one types; without JavaScript the filter form submits ?q= instead.
document.addEventListener("DOMContentLoaded", () => {
  const input = document.getElementById("filter");
  if (!input) return;
  const apply = () => {
    const words = input.value.toLowerCase().trim().split(/\s+/).filter(Boolean);
    for (const row of document.querySelectorAll("#models tbody tr.row")) {
      const text = row.dataset.filter || "";
      row.hidden = !words.every((word) => text.includes(word));
    }
  };
  input.addEventListener("input", apply);
  // Rows replaced by htmx keep the current filter.
  document.body.addEventListener("htmx:afterSwap", apply);
  input.form.addEventListener("submit", (event) => { event.preventDefault(); apply(); });
});
