// Live progress of a dial session: the lines connect-now prints, over Server-Sent Events.
(function () {
  function follow(box) {
    if (box.dataset.following) return;
    box.dataset.following = "1";
    var lines = box.querySelector("#progress-lines");
    var end = box.querySelector("#progress-end");
    var source = new EventSource(box.dataset.events);
    source.addEventListener("line", function (e) {
      lines.textContent += e.data + "\n";
      lines.scrollTop = lines.scrollHeight;
    });
    source.addEventListener("end", function (e) {
      end.textContent = "session " + e.data;
      box.classList.add("ended", e.data);
      source.close();
      // The figures above (queue, last session, line time) changed with the session.
      if (document.getElementById("figures") && window.htmx) {
        htmx.ajax("GET", "/", {target: "#figures", select: "#figures", swap: "outerHTML"});
      }
    });
  }
  function scan(root) {
    (root.querySelectorAll ? root : document).querySelectorAll("[data-events]").forEach(follow);
  }
  document.addEventListener("DOMContentLoaded", function () { scan(document); });
  document.addEventListener("htmx:afterSwap", function (e) { scan(e.target); });
})();
